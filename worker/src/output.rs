//! Live output of running attempts (worker protocol 6).
//!
//! Every attempt of an agent that produces output (`exec`, `http`, `llm`; not the
//! built-ins) gets an [`OutputLog`], shared by the attempt's task (which appends each
//! piece as the agent produces it) and the [core](crate::core) (which marks it watched
//! or not, and takes the tail for the report). It holds:
//!
//! * the **tail**: the last `log_tail_bytes` bytes of the attempt's output as runs tagged
//!   with their stream, oldest first. All the streams of an attempt share one sequence of
//!   bytes numbered from 0; the tail starts at `total - held`. Trimming from the front
//!   skips the continuation bytes of a UTF-8 character cut in two (at most 3 bytes), so
//!   the tail may hold a little less than the bound.
//! * the **watch**: whether the coordinator watches the attempt, and the session's
//!   [`OutputSink`] to send [`WorkerMsg::Output`] on. A watch starts by sending what the
//!   tail holds from the offset asked for, then sends every new piece at once, both under
//!   the log's mutex, so the chunks go out in offset order.
//!
//! **Never blocking the agent.** The session's queue toward the coordinator is unbounded;
//! what bounds it is the session's [`OutputBudget`]: the bytes of `Output` chunks queued
//! but not yet written by the connection's writer, at most [`MAX_QUEUED_OUTPUT_BYTES`]. A
//! chunk that does not fit is dropped (counted in
//! [`WorkerStats::output_dropped_bytes`](crate::WorkerStats::output_dropped_bytes)); the
//! next chunk sent carries its true offset, so the coordinator sees the gap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use swarm_proto::worker::{AttemptRef, LogPiece, LogTail, OutputChunk, OutputStream, WorkerMsg};
use tokio::sync::mpsc;

/// The default of [`WorkerConfig::log_tail_bytes`](crate::WorkerConfig::log_tail_bytes):
/// how much of each attempt's output the worker keeps and reports with its end.
pub const DEFAULT_LOG_TAIL_BYTES: usize = 16 * 1024;

/// The largest log tail kept, whatever is configured: a report carrying it must still fit
/// in one frame.
pub const MAX_LOG_TAIL_BYTES: usize = 1 << 20;

/// The most data one [`WorkerMsg::Output`] chunk carries; a longer piece is sent as
/// several chunks.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// The most output bytes queued toward the coordinator on one session (sent, not yet
/// written by the connection's writer); chunks beyond it are dropped.
pub const MAX_QUEUED_OUTPUT_BYTES: usize = 1 << 20;

/// Locks `m`, whatever a panicking holder left: every update of the state below keeps it
/// consistent between statements that can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The output bytes queued on one session and not yet written: reserved by whoever sends
/// an `Output` chunk, released by the connection's writer once it wrote the frame.
#[derive(Debug, Default)]
pub(crate) struct OutputBudget {
    queued: AtomicUsize,
}

impl OutputBudget {
    /// Takes `n` bytes of the budget, if they fit.
    fn reserve(&self, n: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(n).filter(|t| *t <= MAX_QUEUED_OUTPUT_BYTES)
            })
            .is_ok()
    }

    /// Gives back `n` bytes.
    fn release(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// The writer wrote `batch`: gives back the bytes of its `Output` chunks.
    pub(crate) fn written(&self, batch: &[WorkerMsg]) {
        let n: usize = batch
            .iter()
            .map(|m| match m {
                WorkerMsg::Output(c) => c.data.len(),
                _ => 0,
            })
            .sum();
        if n > 0 {
            self.release(n);
        }
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Where a watched attempt's output goes: the current session's queue, its budget, and
/// the worker's count of dropped bytes.
#[derive(Clone)]
pub(crate) struct OutputSink {
    pub(crate) tx: mpsc::UnboundedSender<WorkerMsg>,
    pub(crate) budget: Arc<OutputBudget>,
    pub(crate) dropped: Arc<AtomicU64>,
}

impl OutputSink {
    /// Sends `data`, which starts at `offset`, as chunks of at most [`MAX_CHUNK_BYTES`];
    /// a chunk that does not fit in the budget is dropped. `false`: the session is gone.
    fn send(&self, attempt: AttemptRef, stream: OutputStream, offset: u64, data: &[u8]) -> bool {
        let mut offset = offset;
        for piece in data.chunks(MAX_CHUNK_BYTES) {
            if self.budget.reserve(piece.len()) {
                let chunk = OutputChunk {
                    attempt,
                    stream,
                    offset,
                    data: piece.to_vec(),
                };
                if self.tx.send(WorkerMsg::Output(chunk)).is_err() {
                    return false;
                }
            } else {
                self.dropped
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            offset += piece.len() as u64;
        }
        true
    }
}

/// One attempt's output: its tail and its watch (see the [module docs](self)).
pub(crate) struct OutputLog {
    attempt: AttemptRef,
    /// How many bytes the tail keeps.
    cap: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The tail's bytes.
    bytes: VecDeque<u8>,
    /// The tail's runs, oldest first: each stream and how many of `bytes` it holds.
    /// Consecutive runs are of different streams.
    runs: VecDeque<(OutputStream, usize)>,
    /// The attempt's whole output so far, in bytes.
    total: u64,
    /// Set while the coordinator watches the attempt.
    watch: Option<OutputSink>,
    /// The attempt ended ([`OutputLog::finish`]): nothing is kept or sent any more.
    closed: bool,
}

impl State {
    /// Where the tail starts in the attempt's output.
    fn tail_offset(&self) -> u64 {
        self.total - self.bytes.len() as u64
    }

    /// Adds `data` to the tail, then trims the tail to `cap` bytes.
    fn keep(&mut self, stream: OutputStream, data: &[u8], cap: usize) {
        if cap == 0 {
            return;
        }
        let cut = data.len() > cap;
        let data = if cut { &data[data.len() - cap..] } else { data };
        self.bytes.extend(data);
        match self.runs.back_mut() {
            Some((s, n)) if *s == stream => *n += data.len(),
            _ => self.runs.push_back((stream, data.len())),
        }
        let excess = self.bytes.len().saturating_sub(cap);
        if excess > 0 {
            self.drop_front(excess);
        }
        if excess > 0 || cut {
            // The tail now starts where the output was cut: not inside a character.
            let split = self
                .bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count();
            self.drop_front(split);
        }
    }

    fn drop_front(&mut self, n: usize) {
        self.bytes.drain(..n);
        let mut left = n;
        while left > 0 {
            let Some(front) = self.runs.front_mut() else {
                break;
            };
            if front.1 <= left {
                left -= front.1;
                self.runs.pop_front();
            } else {
                front.1 -= left;
                left = 0;
            }
        }
    }

    /// The tail's bytes `start..end` (indexes into `bytes`).
    fn copy(&self, start: usize, end: usize) -> Vec<u8> {
        let (a, b) = self.bytes.as_slices();
        let mut v = Vec::with_capacity(end - start);
        if start < a.len() {
            v.extend_from_slice(&a[start..end.min(a.len())]);
        }
        if end > a.len() {
            v.extend_from_slice(&b[start.saturating_sub(a.len())..end - a.len()]);
        }
        v
    }

    /// The tail as runs: each with its stream, where it starts in the output, and where
    /// it starts and ends in `bytes`.
    fn runs(&self) -> impl Iterator<Item = (OutputStream, u64, usize, usize)> + '_ {
        let base = self.tail_offset();
        let mut at = 0usize;
        self.runs.iter().map(move |&(stream, n)| {
            let start = at;
            at += n;
            (stream, base + start as u64, start, at)
        })
    }
}

impl OutputLog {
    /// The log of `attempt`, keeping a tail of `cap` bytes (0: none).
    pub(crate) fn new(attempt: AttemptRef, cap: usize) -> Self {
        OutputLog {
            attempt,
            cap: cap.min(MAX_LOG_TAIL_BYTES),
            state: Mutex::new(State::default()),
        }
    }

    /// A piece of output from `stream`: kept in the tail, and sent at once if watched.
    pub(crate) fn append(&self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut s = lock(&self.state);
        if s.closed {
            return;
        }
        let offset = s.total;
        s.total += data.len() as u64;
        if let Some(sink) = &s.watch {
            if !sink.send(self.attempt, stream, offset, data) {
                s.watch = None;
            }
        }
        s.keep(stream, data, self.cap);
    }

    /// The coordinator watches: send what the tail holds from `from` on (or from where
    /// it starts, if later), then every new piece, on `sink`. Replaces an earlier watch.
    /// Nothing once the attempt ended.
    pub(crate) fn watch(&self, sink: OutputSink, from: u64) {
        let mut s = lock(&self.state);
        if s.closed {
            return;
        }
        let mut alive = true;
        for (stream, offset, start, end) in s.runs() {
            let run_end = offset + (end - start) as u64;
            if run_end <= from {
                continue;
            }
            let skip = usize::try_from(from.saturating_sub(offset)).unwrap_or(usize::MAX);
            let start = start + skip;
            let data = s.copy(start, end);
            if !sink.send(self.attempt, stream, offset + skip as u64, &data) {
                alive = false;
                break;
            }
        }
        s.watch = alive.then_some(sink);
    }

    /// Nobody watches any more: stop sending.
    pub(crate) fn unwatch(&self) {
        lock(&self.state).watch = None;
    }

    /// The attempt ended: returns its tail, and ignores whatever comes later (a reader
    /// of a killed agent's pipe may still be finishing).
    pub(crate) fn finish(&self) -> LogTail {
        let mut s = lock(&self.state);
        s.closed = true;
        s.watch = None;
        let tail = LogTail {
            offset: s.tail_offset(),
            pieces: s
                .runs()
                .map(|(stream, _, start, end)| LogPiece {
                    stream,
                    data: s.copy(start, end),
                })
                .collect(),
        };
        s.bytes = VecDeque::new();
        s.runs = VecDeque::new();
        tail
    }

    /// Whether the coordinator watches the attempt now.
    #[cfg(test)]
    pub(crate) fn watched(&self) -> bool {
        lock(&self.state).watch.is_some()
    }
}

/// Where an attempt's output pieces go: its log, or nowhere (built-ins, and attempts run
/// outside a worker, such as through [`crate::Executor::run`]).
#[derive(Clone, Default)]
pub(crate) struct OutputTap(Option<Arc<OutputLog>>);

impl OutputTap {
    /// Pieces go to `log`.
    pub(crate) fn to(log: Arc<OutputLog>) -> Self {
        OutputTap(Some(log))
    }

    /// A piece of output from `stream`.
    pub(crate) fn append(&self, stream: OutputStream, data: &[u8]) {
        if let Some(log) = &self.0 {
            log.append(stream, data);
        }
    }

    /// The attempt ended: its tail (empty without a log).
    pub(crate) fn finish(&self) -> LogTail {
        self.0.as_ref().map(|l| l.finish()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AttemptRef = AttemptRef {
        task_id: 7,
        attempt: 1,
    };

    fn sink() -> (OutputSink, mpsc::UnboundedReceiver<WorkerMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = OutputSink {
            tx,
            budget: Arc::new(OutputBudget::default()),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (sink, rx)
    }

    fn chunks(rx: &mut mpsc::UnboundedReceiver<WorkerMsg>) -> Vec<OutputChunk> {
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                WorkerMsg::Output(c) => v.push(c),
                other => panic!("unexpected {other:?}"),
            }
        }
        v
    }

    fn piece(stream: OutputStream, data: &[u8]) -> LogPiece {
        LogPiece {
            stream,
            data: data.to_vec(),
        }
    }

    use OutputStream::{Stderr, Stdout, Tokens};

    #[test]
    fn the_tail_keeps_the_last_bytes_merging_runs_of_one_stream() {
        let log = OutputLog::new(A, 10);
        log.append(Stdout, b"abc");
        log.append(Stdout, b"def");
        log.append(Stderr, b"");
        log.append(Stderr, b"gh");
        log.append(Stdout, b"ijklm");
        // 13 bytes so far: "abcdefghijklm", the last 10 kept.
        let tail = log.finish();
        assert_eq!(tail.offset, 3);
        assert_eq!(
            tail.pieces,
            vec![
                piece(Stdout, b"def"),
                piece(Stderr, b"gh"),
                piece(Stdout, b"ijklm")
            ]
        );
        assert_eq!(tail.end(), 13);
        // Once finished, nothing more is kept or counted.
        log.append(Stdout, b"late");
        let again = log.finish();
        assert!(again.is_empty());
        assert_eq!(again.end(), 13);
    }

    #[test]
    fn a_piece_longer_than_the_tail_leaves_its_end_and_a_zero_tail_keeps_nothing() {
        let log = OutputLog::new(A, 4);
        log.append(Stderr, b"ab");
        log.append(Stdout, b"0123456789");
        let tail = log.finish();
        assert_eq!(
            (tail.offset, tail.pieces),
            (8, vec![piece(Stdout, b"6789")])
        );

        let log = OutputLog::new(A, 0);
        log.append(Stdout, b"0123456789");
        let tail = log.finish();
        assert_eq!((tail.offset, tail.len()), (10, 0));
        assert!(tail.is_empty());
    }

    #[test]
    fn trimming_does_not_leave_half_a_character() {
        // "é" is two bytes: cutting the output one byte into it drops the other byte too.
        let log = OutputLog::new(A, 4);
        log.append(Stdout, "aé".as_bytes()); // a, 0xC3, 0xA9
        log.append(Stdout, b"xyz");
        // The last 4 bytes start with 0xA9: the tail is "xyz", starting at 3.
        let tail = log.finish();
        assert_eq!((tail.offset, tail.pieces), (3, vec![piece(Stdout, b"xyz")]));
        // Bytes that are not UTF-8 lose at most 3.
        let log = OutputLog::new(A, 4);
        log.append(Stdout, &[0x80; 10]);
        let tail = log.finish();
        assert_eq!((tail.offset, tail.len()), (9, 1));
    }

    #[test]
    fn a_watch_replays_the_tail_from_the_offset_asked_then_sends_live_pieces() {
        let log = OutputLog::new(A, 8);
        log.append(Stdout, b"0123");
        log.append(Stderr, b"4567");
        log.append(Stdout, b"89");
        // The tail is "23" + "4567" + "89" from offset 2; the watcher has up to 3.
        let (s, mut rx) = sink();
        log.watch(s, 3);
        assert!(log.watched());
        let got: Vec<(OutputStream, u64, Vec<u8>)> = chunks(&mut rx)
            .into_iter()
            .map(|c| (c.stream, c.offset, c.data))
            .collect();
        assert_eq!(
            got,
            vec![
                (Stdout, 3, b"3".to_vec()),
                (Stderr, 4, b"4567".to_vec()),
                (Stdout, 8, b"89".to_vec())
            ]
        );
        log.append(Tokens, b"ab");
        let c = chunks(&mut rx);
        assert_eq!(
            (c[0].stream, c[0].offset, &c[0].data[..]),
            (Tokens, 10, &b"ab"[..])
        );
        // From before the tail: from where it starts. Past the end: nothing replayed.
        let (s, mut rx) = sink();
        log.watch(s, 0);
        assert_eq!(chunks(&mut rx)[0].offset, 4);
        let (s, mut rx) = sink();
        log.watch(s, 100);
        assert!(chunks(&mut rx).is_empty());
        // Unwatched: nothing sent, still kept.
        log.unwatch();
        log.append(Stdout, b"cd");
        assert!(chunks(&mut rx).is_empty());
        assert_eq!(log.finish().end(), 14);
        // A log that ended is not watched any more.
        let (s, _rx) = sink();
        log.watch(s, 0);
        assert!(!log.watched());
    }

    #[test]
    fn long_pieces_go_out_in_chunks_and_a_gone_session_ends_the_watch() {
        let log = OutputLog::new(A, 0);
        let (s, mut rx) = sink();
        log.watch(s, 0);
        let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
        log.append(Stdout, &data);
        let c = chunks(&mut rx);
        let sizes: Vec<(u64, usize)> = c.iter().map(|c| (c.offset, c.data.len())).collect();
        assert_eq!(
            sizes,
            vec![(0, 65536), (65536, 65536), (131_072, 150_000 - 131_072)]
        );
        assert_eq!(
            c.iter().flat_map(|c| c.data.clone()).collect::<Vec<u8>>(),
            data
        );
        drop(rx);
        log.append(Stdout, b"x");
        assert!(!log.watched(), "the session is gone");
    }

    /// Nobody drains the session's queue: once the budget is used up, pieces are dropped
    /// (counted), and the next piece sent after room is made carries its true offset.
    #[test]
    fn pieces_beyond_the_budget_are_dropped_and_the_next_one_shows_the_gap() {
        let log = OutputLog::new(A, 1024);
        let (s, mut rx) = sink();
        let budget = s.budget.clone();
        let dropped = s.dropped.clone();
        log.watch(s, 0);
        let piece = vec![b'x'; 60 * 1024];
        for _ in 0..20 {
            log.append(Stdout, &piece);
        }
        // 17 pieces of 60 KiB fit in 1 MiB, the other 3 are dropped.
        let sent = chunks(&mut rx);
        assert_eq!(sent.len(), 17);
        for (i, c) in sent.iter().enumerate() {
            assert_eq!(
                c.offset,
                (i * piece.len()) as u64,
                "contiguous while they fit"
            );
        }
        assert_eq!(budget.queued(), 17 * piece.len());
        assert_eq!(dropped.load(Ordering::Relaxed), 3 * piece.len() as u64);
        // Still watched: a small piece that fits goes out right away.
        log.append(Stderr, b"small");
        let c = chunks(&mut rx);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].offset, 20 * piece.len() as u64);
        // The writer wrote what was queued: room again, and the gap stays visible.
        let written: Vec<WorkerMsg> = sent
            .into_iter()
            .chain(c)
            .map(WorkerMsg::Output)
            .chain([WorkerMsg::Heartbeat { running: vec![] }])
            .collect();
        budget.written(&written);
        assert_eq!(budget.queued(), 0);
        log.append(Stdout, &piece);
        let c = chunks(&mut rx);
        assert_eq!(c[0].offset, 20 * piece.len() as u64 + 5);
        assert!(log.watched());
    }
}
