//! The dump format: the whole replicated state as a stream of bounded records. Raft
//! snapshots travel in it (leader → follower, in chunks) and backups are files in it, so
//! neither side ever holds the whole state in one buffer.
//!
//! ```text
//! magic "SWBACKUP" | format u32 LE (2)
//! record* : len u32 LE | body (swarm-codec of a Record)
//! ```
//!
//! The first record is a [`Record::Header`], the last a [`Record::End`] carrying the
//! number of records and tasks before it and a checksum of every byte before it (magic
//! included), so a truncated or damaged stream is refused before it is used. Bodies are
//! at most [`MAX_RECORD`] bytes. Format 1 (a single bincode blob behind the same magic)
//! is refused with a message naming it.

use std::io::{self, Read, Write};

use openraft::StoredMembership;
use serde::{Deserialize, Serialize};

use super::types::{LogId, NodeAddr, NodeId};
use crate::state::format1::TaskV1;
use crate::state::{Access, Callbacks, Ledger, Limits, Schedules, TableMeta, Task};

const MAGIC: &[u8; 8] = b"SWBACKUP";
/// This format's version. Format 5 encodes tasks with their flow (`Task::flow`: graph
/// parents and children, flow controls); formats 2 to 4 hold tasks without it and read
/// as [`RecordV4`]. Format 4 may hold attempts ended with their log tail and usage
/// (`AttemptEnd::Logged`), which releases reading format 3 cannot decode. Format 6 adds
/// a [`Record::Limits`] (format 5 reads as [`Record`] too: it is a prefix of it), and
/// format 7 a [`Record::Callbacks`] (likewise).
pub const DUMP_FORMAT: u32 = 7;
/// The oldest format this release reads (format 2 has no [`Record::Access`]).
pub const OLDEST_DUMP_FORMAT: u32 = 2;
const PREAMBLE: usize = 12;
/// Largest record body: a record holds one task of any size, or a batch of tasks and
/// memory bytes up to [`BATCH_BYTES`].
pub const MAX_RECORD: usize = 256 << 20;
const _: () = assert!(crate::limits::ACCESS_DECODE_LIMIT <= MAX_RECORD);
const _: () = assert!(crate::limits::SCHEDULES_DECODE_LIMIT <= MAX_RECORD);
/// Tasks and memory bytes are batched into records of about this size.
pub const BATCH_BYTES: usize = 1 << 20;

/// What a dump starts with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The last log entry reflected (snapshots); `None` in an empty replica.
    pub applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, NodeAddr>,
    pub meta: TableMeta,
    /// What follows, for progress reports and checks.
    pub tasks: u64,
    pub memory_bytes: u64,
    pub staged_bytes: u64,
}

/// One record of a dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Header(Box<Header>),
    /// Tasks, live or finished, in no particular order.
    Tasks(Vec<Task>),
    /// The next piece of the memory store's snapshot bytes.
    Memory(Vec<u8>),
    /// The next piece of the memory bytes a restore in progress has staged.
    Staged(Vec<u8>),
    End {
        records: u64,
        tasks: u64,
        checksum: u64,
    },
    /// The API tokens and revoked certificates (format 3 on; absent: none).
    Access(Box<Access>),
    /// Token usage and budgets (format 4 on; absent: none).
    Ledger(Box<Ledger>),
    /// The schedules (format 5 on; absent: none).
    Schedules(Box<Schedules>),
    /// The named limits (format 6 on; absent: none).
    Limits(Box<Limits>),
    /// The callback outbox (format 7 on; absent: empty).
    Callbacks(Box<Callbacks>),
}

/// A record of formats 2 to 4: tasks of state format 1 ([`TaskV1`]). Variants as
/// [`Record`]'s were then, in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordV4 {
    Header(Box<Header>),
    Tasks(Vec<TaskV1>),
    Memory(Vec<u8>),
    Staged(Vec<u8>),
    End {
        records: u64,
        tasks: u64,
        checksum: u64,
    },
    Access(Box<Access>),
    Ledger(Box<Ledger>),
}

impl From<RecordV4> for Record {
    fn from(r: RecordV4) -> Record {
        match r {
            RecordV4::Header(h) => Record::Header(h),
            RecordV4::Tasks(t) => Record::Tasks(t.into_iter().map(Task::from).collect()),
            RecordV4::Memory(m) => Record::Memory(m),
            RecordV4::Staged(m) => Record::Staged(m),
            RecordV4::End {
                records,
                tasks,
                checksum,
            } => Record::End {
                records,
                tasks,
                checksum,
            },
            RecordV4::Access(a) => Record::Access(a),
            RecordV4::Ledger(l) => Record::Ledger(l),
        }
    }
}

/// A running integrity checksum (not a MAC): FNV-1a over 8-byte words, so any single
/// corrupted word changes the result.
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    len: u64,
    /// Bytes of an incomplete word carried to the next update.
    carry: Vec<u8>,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum {
            h: 0xCBF2_9CE4_8422_2325,
            len: 0,
            carry: Vec::with_capacity(8),
        }
    }
}

impl Checksum {
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if !self.carry.is_empty() {
            let take = (8 - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < 8 {
                return;
            }
            let mut w = [0u8; 8];
            w.copy_from_slice(&self.carry);
            self.word(u64::from_le_bytes(w));
            self.carry.clear();
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        self.carry.extend_from_slice(words.remainder());
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01B3)
            .rotate_left(29);
    }

    pub fn value(&self) -> u64 {
        let mut h = self.clone();
        if !h.carry.is_empty() {
            let mut w = [0u8; 8];
            w[..h.carry.len()].copy_from_slice(&h.carry);
            h.word(u64::from_le_bytes(w));
        }
        (h.h ^ h.len).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Writes a dump record by record.
pub struct DumpWriter<W: Write> {
    out: W,
    sum: Checksum,
    records: u64,
    tasks: u64,
    bytes: u64,
    buf: Vec<u8>,
}

impl<W: Write> DumpWriter<W> {
    /// Start a dump on `out` with its header.
    pub fn new(out: W, header: &Header) -> io::Result<Self> {
        Self::with_format(out, header, DUMP_FORMAT)
    }

    /// A dump stamped with `format` (tests write older formats).
    fn with_format(mut out: W, header: &Header, format: u32) -> io::Result<Self> {
        let mut sum = Checksum::default();
        let mut pre = Vec::with_capacity(PREAMBLE);
        pre.extend_from_slice(MAGIC);
        pre.extend_from_slice(&format.to_le_bytes());
        out.write_all(&pre)?;
        sum.update(&pre);
        let mut w = DumpWriter {
            out,
            sum,
            records: 0,
            tasks: 0,
            bytes: PREAMBLE as u64,
            buf: Vec::new(),
        };
        w.write(&Record::Header(Box::new(header.clone())))?;
        Ok(w)
    }

    /// Append one record (not `Header` or `End`: the writer writes those).
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        swarm_codec::encode_into(record, &mut self.buf).map_err(io::Error::other)?;
        let len = self.buf.len() - 4;
        if len > MAX_RECORD {
            return Err(io::Error::other(format!(
                "a dump record of {len} bytes exceeds the limit of {MAX_RECORD}"
            )));
        }
        self.buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.out.write_all(&self.buf)?;
        self.sum.update(&self.buf);
        self.records += 1;
        self.bytes += self.buf.len() as u64;
        if let Record::Tasks(t) = record {
            self.tasks += t.len() as u64;
        }
        Ok(())
    }

    /// Close the dump with its `End` record; returns the output and the bytes written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let end = Record::End {
            records: self.records,
            tasks: self.tasks,
            checksum: self.sum.value(),
        };
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        swarm_codec::encode_into(&end, &mut self.buf).map_err(io::Error::other)?;
        let len = (self.buf.len() - 4) as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&self.buf)?;
        self.bytes += self.buf.len() as u64;
        self.out.flush()?;
        Ok((self.out, self.bytes))
    }
}

/// Why a dump cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("not a swarm backup or snapshot (bad magic)")]
    Magic,
    #[error(
        "backup format {0}: written by a swarm release before format {DUMP_FORMAT} \
         (bincode), which this release cannot read; take a new backup with the release \
         that wrote it still running, after upgrading it, or restore with that release"
    )]
    OldFormat(u32),
    #[error("backup format {0} is newer than this release reads ({DUMP_FORMAT})")]
    NewerFormat(u32),
    #[error("record {record} claims {len} bytes, more than the limit of {MAX_RECORD}")]
    RecordTooLarge { record: u64, len: usize },
    #[error("record {record} is malformed: {reason}")]
    Malformed { record: u64, reason: String },
    #[error("the dump does not start with a header")]
    NoHeader,
    #[error("the dump is truncated: it ends after {records} records without its end record")]
    Truncated { records: u64 },
    #[error("checksum mismatch: the dump is damaged")]
    Checksum,
    #[error("the end record counts {want} records and {want_tasks} tasks, the dump holds {got} and {got_tasks}")]
    Counts {
        want: u64,
        got: u64,
        want_tasks: u64,
        got_tasks: u64,
    },
    #[error("bytes after the end record")]
    Trailing,
    #[error("reading the dump: {0}")]
    Io(#[from] io::Error),
}

/// Parses a dump from bytes pushed in pieces of any size (a request body, file reads).
/// Checks the preamble, record sizes, counts and the final checksum.
#[derive(Debug, Default)]
pub struct DumpParser {
    buf: Vec<u8>,
    /// Start of unparsed bytes in `buf`.
    at: usize,
    started: bool,
    /// The dump's format, once the preamble was read.
    format: u32,
    records: u64,
    tasks: u64,
    sum: Checksum,
    ended: bool,
}

impl DumpParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes that follow those pushed before.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), DumpError> {
        if self.ended && !bytes.is_empty() {
            return Err(DumpError::Trailing);
        }
        if self.at > 0 && self.at >= self.buf.len() / 2 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete record, if the bytes pushed so far hold one. The `End` record is
    /// verified and returned like the others; after it, nothing more may come.
    pub fn next_record(&mut self) -> Result<Option<Record>, DumpError> {
        if self.ended {
            return Ok(None);
        }
        if !self.started {
            let Some(pre) = self.buf.get(self.at..self.at + PREAMBLE) else {
                return Ok(None);
            };
            if &pre[..8] != MAGIC {
                return Err(DumpError::Magic);
            }
            let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
            match version {
                OLDEST_DUMP_FORMAT..=DUMP_FORMAT => {}
                v if v < OLDEST_DUMP_FORMAT => return Err(DumpError::OldFormat(v)),
                v => return Err(DumpError::NewerFormat(v)),
            }
            let pre = pre.to_vec();
            self.sum.update(&pre);
            self.at += PREAMBLE;
            self.started = true;
            self.format = version;
        }
        let Some(head) = self.buf.get(self.at..self.at + 4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_RECORD {
            return Err(DumpError::RecordTooLarge {
                record: self.records,
                len,
            });
        }
        let Some(body) = self.buf.get(self.at + 4..self.at + 4 + len) else {
            return Ok(None);
        };
        let record = if self.format < 5 {
            swarm_codec::decode::<RecordV4>(body, MAX_RECORD).map(Record::from)
        } else {
            swarm_codec::decode::<Record>(body, MAX_RECORD)
        }
        .map_err(|e| DumpError::Malformed {
            record: self.records,
            reason: e.to_string(),
        })?;
        match &record {
            Record::Header(_) if self.records != 0 => {
                return Err(DumpError::Malformed {
                    record: self.records,
                    reason: "a second header".into(),
                })
            }
            Record::Header(_) => {}
            _ if self.records == 0 => return Err(DumpError::NoHeader),
            Record::End {
                records,
                tasks,
                checksum,
            } => {
                if *checksum != self.sum.value() {
                    return Err(DumpError::Checksum);
                }
                if *records != self.records || *tasks != self.tasks {
                    return Err(DumpError::Counts {
                        want: *records,
                        got: self.records,
                        want_tasks: *tasks,
                        got_tasks: self.tasks,
                    });
                }
                self.ended = true;
            }
            Record::Tasks(t) => self.tasks += t.len() as u64,
            Record::Memory(_)
            | Record::Staged(_)
            | Record::Access(_)
            | Record::Ledger(_)
            | Record::Schedules(_)
            | Record::Limits(_)
            | Record::Callbacks(_) => {}
        }
        if !self.ended {
            let framed = &self.buf[self.at..self.at + 4 + len];
            self.sum.update(framed);
            self.records += 1;
        }
        self.at += 4 + len;
        if self.ended && self.at < self.buf.len() {
            return Err(DumpError::Trailing);
        }
        Ok(Some(record))
    }

    /// Whether the `End` record has been read (and checked).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Call when the input is exhausted: an error unless the dump ended properly.
    pub fn finish(&self) -> Result<(), DumpError> {
        if self.ended {
            Ok(())
        } else {
            Err(DumpError::Truncated {
                records: self.records,
            })
        }
    }
}

/// Reads a dump from a blocking reader, record by record.
pub struct DumpReader<R: Read> {
    input: R,
    parser: DumpParser,
    chunk: Vec<u8>,
    eof: bool,
}

impl<R: Read> DumpReader<R> {
    pub fn new(input: R) -> Self {
        DumpReader {
            input,
            parser: DumpParser::new(),
            chunk: vec![0; 1 << 20],
            eof: false,
        }
    }

    /// The next record; `None` after the (verified) `End` record.
    pub fn next_record(&mut self) -> Result<Option<Record>, DumpError> {
        loop {
            if let Some(r) = self.parser.next_record()? {
                return Ok(Some(r));
            }
            if self.parser.ended() {
                // Nothing may follow the end record.
                let n = self.input.read(&mut self.chunk)?;
                if n > 0 {
                    return Err(DumpError::Trailing);
                }
                return Ok(None);
            }
            if self.eof {
                self.parser.finish()?;
                return Ok(None);
            }
            let n = self.input.read(&mut self.chunk)?;
            if n == 0 {
                self.eof = true;
            } else {
                self.parser.push(&self.chunk[..n])?;
            }
        }
    }

    /// The header, which must come first.
    pub fn header(&mut self) -> Result<Header, DumpError> {
        match self.next_record()? {
            Some(Record::Header(h)) => Ok(*h),
            _ => Err(DumpError::NoHeader),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            applied: None,
            membership: StoredMembership::default(),
            meta: TableMeta::default(),
            tasks: 0,
            memory_bytes: 3,
            staged_bytes: 0,
        }
    }

    fn dump() -> Vec<u8> {
        let mut w = DumpWriter::new(Vec::new(), &header()).unwrap();
        w.write(&Record::Memory(vec![1, 2, 3])).unwrap();
        w.write(&Record::Tasks(Vec::new())).unwrap();
        w.finish().unwrap().0
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, DumpError> {
        let mut r = DumpReader::new(bytes);
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_in_pieces_of_any_size() {
        let bytes = dump();
        let all = read_all(&bytes).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], Record::Header(Box::new(header())));
        for step in [1, 3, 7, 64] {
            let mut p = DumpParser::new();
            let mut n = 0;
            for piece in bytes.chunks(step) {
                p.push(piece).unwrap();
                while p.next_record().unwrap().is_some() {
                    n += 1;
                }
            }
            p.finish().unwrap();
            assert_eq!(n, 4);
        }
    }

    #[test]
    fn format_2_without_access_still_reads_and_format_1_does_not() {
        for (format, ok) in [(2, true), (1, false), (DUMP_FORMAT + 1, false)] {
            let mut w = DumpWriter::with_format(Vec::new(), &header(), format).unwrap();
            w.write(&Record::Memory(vec![1, 2, 3])).unwrap();
            let bytes = w.finish().unwrap().0;
            assert_eq!(read_all(&bytes).is_ok(), ok, "format {format}");
        }
    }

    /// A format 4 dump (tasks of state format 1) reads with its tasks whole, without
    /// flow; a format 5 dump carries a task's flow.
    #[test]
    fn format_4_tasks_read_without_flow_and_format_5_keeps_it() {
        let task = Task {
            id: 3,
            spec: crate::state::TaskSpec {
                agent: "echo".into(),
                payload: b"in".to_vec(),
                priority: 2,
                timeout_ms: 10,
                max_attempts: 1,
                idempotency_key: Some("k".into()),
                labels: Default::default(),
                patterns: 0,
                swarm: "default".into(),
                stages: Vec::new(),
                retain_ms: 9,
            },
            state: swarm_proto::api::TaskState::Succeeded,
            attempts: Vec::new(),
            output: Some(b"out".to_vec()),
            error: None,
            created_at_ms: 1,
            finished_at_ms: Some(2),
            expires_at_ms: Some(11),
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 4,
            flow: None,
        };
        let v1 = TaskV1 {
            id: task.id,
            spec: task.spec.clone(),
            state: task.state,
            attempts: task.attempts.clone(),
            output: task.output.clone(),
            error: task.error.clone(),
            created_at_ms: task.created_at_ms,
            finished_at_ms: task.finished_at_ms,
            expires_at_ms: task.expires_at_ms,
            not_before_ms: task.not_before_ms,
            stage: task.stage,
            stage_base: task.stage_base,
            released: task.released,
            stage_outputs: task.stage_outputs.clone(),
            moves: task.moves,
        };
        // Format 4, framed and summed by hand as a release of then wrote it.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&4u32.to_le_bytes());
        let mut sum = Checksum::default();
        sum.update(&bytes);
        let mut h = header();
        h.tasks = 1;
        for rec in [
            RecordV4::Header(Box::new(h.clone())),
            RecordV4::Tasks(vec![v1]),
        ] {
            let body = swarm_codec::encode(&rec).unwrap();
            let mut framed = (body.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&body);
            sum.update(&framed);
            bytes.extend_from_slice(&framed);
        }
        let end = swarm_codec::encode(&RecordV4::End {
            records: 2,
            tasks: 1,
            checksum: sum.value(),
        })
        .unwrap();
        bytes.extend_from_slice(&(end.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&end);
        let read = read_all(&bytes).unwrap();
        let Record::Tasks(tasks) = &read[1] else {
            panic!("{read:?}")
        };
        let mut want = task.clone();
        want.flow = None;
        assert_eq!(tasks, &vec![want]);

        let mut flowing = task;
        flowing.flow = Some(Box::new(crate::state::Flow {
            parents: vec![1, 2],
            step: Some("d".into()),
            ..Default::default()
        }));
        let mut w = DumpWriter::new(Vec::new(), &h).unwrap();
        w.write(&Record::Tasks(vec![flowing.clone()])).unwrap();
        let bytes = w.finish().unwrap().0;
        let read = read_all(&bytes).unwrap();
        assert!(matches!(&read[1], Record::Tasks(t) if t == &vec![flowing]));
    }

    #[test]
    fn damage_of_any_kind_is_refused() {
        let bytes = dump();
        // Every truncation.
        for cut in 0..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Every single-bit flip.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(read_all(&bad).is_err(), "flip at {i}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(read_all(&long), Err(DumpError::Trailing)));
        let mut old = bytes.clone();
        old[8] = 1;
        assert!(read_all(&old).unwrap_err().to_string().contains("format 1"));
    }

    #[test]
    fn a_lying_length_is_refused_before_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&DUMP_FORMAT.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_all(&bytes),
            Err(DumpError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn checksum_sees_word_boundaries_the_same_however_fed() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = Checksum::default();
        whole.update(&data);
        for step in [1, 5, 8, 13] {
            let mut parts = Checksum::default();
            for p in data.chunks(step) {
                parts.update(p);
            }
            assert_eq!(parts.value(), whole.value());
        }
    }
}
