//! `POST /v1/restore`: a backup (dump) streamed in as an HTTP body, parsed with
//! `DumpParser` in pieces exactly as `backup::run_restore` drives it.
//!
//! Input: `mode`, then bytes. Even `mode`: the bytes are the body as sent. Odd `mode`: the
//! bytes are the dump's records (u32 LE length, body) and the preamble, end record and
//! checksum are made right around them, so the records themselves get fuzzed. `mode >> 1`
//! is the largest piece the body arrives in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_coordinator::raft::dump::{DumpParser, Record};
use swarm_fuzz::{framed_dump, pieces};

fn restore(body: &[u8], step: u8) {
    let chunks = pieces(body, step, body.len() as u8);
    let mut chunks = chunks.into_iter();
    let mut parser = DumpParser::new();
    let mut records = 0u64;
    loop {
        let record = match parser.next_record() {
            Ok(r) => r,
            Err(_) => return,
        };
        let Some(record) = record else {
            if parser.ended() {
                break;
            }
            match chunks.next() {
                Some(bytes) => {
                    if parser.push(bytes).is_err() {
                        return;
                    }
                    continue;
                }
                None => {
                    if parser.finish().is_err() {
                        return;
                    }
                    break;
                }
            }
        };
        match record {
            Record::Header(_) => assert_eq!(records, 0, "a header after the first record"),
            Record::Tasks(batch) => {
                for t in &batch {
                    let _ = t.size_hint();
                }
            }
            Record::Memory(_)
            | Record::Staged(_)
            | Record::Access(_)
            | Record::Ledger(_)
            | Record::Schedules(_)
            | Record::Limits(_)
            | Record::Callbacks(_) => {}
            Record::End { .. } => assert!(parser.ended()),
        }
        records += 1;
    }
    // Parsed whole: the dump was complete and verified.
    assert!(parser.ended());
    assert!(parser.finish().is_ok());
}

fuzz_target!(
    init: swarm_fuzz::init("backup_restore"),
    |data: &[u8]| {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let step = (mode >> 1).max(1);
        if mode % 2 == 0 {
            restore(rest, step);
        } else {
            restore(&framed_dump(rest), step);
        }
    }
);
