//! Length-delimited frames on quinn streams.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload, which is one
//! message encoded with [`crate::codec::encode`]. QUIC streams are byte streams, so the
//! length prefix is what restores message boundaries.

use bytes::{Buf, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, CodecError};

/// Default largest payload a [`FrameReader`] accepts and a [`FrameWriter`] sends: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Size of the length prefix.
const HEADER: usize = 4;

/// How many quinn chunks one read may collect. Chunks are roughly one packet each, so
/// collecting several per call keeps the per-frame cost low when frames are small.
const CHUNKS_PER_READ: usize = 32;

/// Buffers are shrunk back to this capacity after a burst that made them larger than
/// [`RETAIN_LIMIT`], so one large batch does not pin memory for the life of a stream.
const RETAIN_CAPACITY: usize = 64 * 1024;
const RETAIN_LIMIT: usize = 1024 * 1024;

/// A failure to send or receive a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame's length exceeds the limit. On receive nothing was allocated for it, and
    /// the stream is unusable afterwards (frame boundaries are lost).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the frame (header) claimed.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A complete frame whose payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[source] CodecError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes received)")]
    Truncated {
        /// Bytes the frame needed (header plus payload, or just the header if it was cut).
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A message could not be encoded.
    #[error("encode: {0}")]
    Encode(#[source] CodecError),
    /// Reading from the stream failed (connection lost, stream reset by the peer, ...).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing to the stream failed (connection lost, stream stopped by the peer, ...).
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset locally.
    #[error("stream already closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

impl FrameError {
    /// Whether the peer violated the framing protocol (oversize, malformed or truncated
    /// frame), as opposed to a network failure or a local error.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            FrameError::TooLarge { .. } | FrameError::Malformed(_) | FrameError::Truncated { .. }
        )
    }

    /// Whether the stream carried 0-RTT data that the server rejected.
    pub fn is_zero_rtt_rejected(&self) -> bool {
        matches!(
            self,
            FrameError::Write(quinn::WriteError::ZeroRttRejected)
                | FrameError::Read(quinn::ReadError::ZeroRttRejected)
        )
    }
}

/// Sends frames on a [`quinn::SendStream`].
pub struct FrameWriter {
    stream: quinn::SendStream,
    /// Reused across sends so steady-state sending does not allocate.
    buf: Vec<u8>,
    max: usize,
}

impl FrameWriter {
    /// Wraps a send stream; frames larger than [`DEFAULT_MAX_FRAME`] are refused.
    pub fn new(stream: quinn::SendStream) -> Self {
        Self::with_max_frame(stream, DEFAULT_MAX_FRAME)
    }

    /// Wraps a send stream, refusing frames whose payload exceeds `max` bytes (capped at
    /// `u32::MAX`, the largest length the header can express).
    pub fn with_max_frame(stream: quinn::SendStream, max: usize) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            max: max.min(u32::MAX as usize),
        }
    }

    /// Sends one message as one frame.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.buf.clear();
        append_frame(&mut self.buf, msg, self.max)?;
        self.flush_buf().await
    }

    /// Sends many messages with a single stream write. Either every message is encoded
    /// and handed to the stream, or (on an encoding or size error) none is.
    pub async fn send_batch<T: Serialize>(&mut self, msgs: &[T]) -> Result<(), FrameError> {
        self.buf.clear();
        for msg in msgs {
            if let Err(e) = append_frame(&mut self.buf, msg, self.max) {
                self.buf.clear();
                return Err(e);
            }
        }
        self.flush_buf().await
    }

    async fn flush_buf(&mut self) -> Result<(), FrameError> {
        let res = self.stream.write_all(&self.buf).await;
        self.buf.clear();
        if self.buf.capacity() > RETAIN_LIMIT {
            self.buf.shrink_to(RETAIN_CAPACITY);
        }
        Ok(res?)
    }

    /// Finishes the stream: the peer's reader sees a clean end after the last frame.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        Ok(self.stream.finish()?)
    }

    /// The largest payload this writer sends.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// The underlying stream, e.g. to reset it or set its priority.
    pub fn get_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }

    /// Unwraps the underlying stream.
    pub fn into_inner(self) -> quinn::SendStream {
        self.stream
    }
}

/// Appends `[len][payload]` for `msg` to `buf`, leaving `buf` unchanged on error.
fn append_frame<T: Serialize>(buf: &mut Vec<u8>, msg: &T, max: usize) -> Result<(), FrameError> {
    let start = buf.len();
    // Encode behind a zeroed length header and patch the length in afterwards: the
    // encoded size is not known until the message has been encoded.
    buf.extend_from_slice(&[0; HEADER]);
    codec::encode_into(msg, buf).map_err(|e| {
        buf.truncate(start);
        FrameError::Encode(e)
    })?;
    let len = buf.len() - start - HEADER;
    // `max` is capped at u32::MAX, so a length that passes this check fits the header.
    let header = match u32::try_from(len) {
        Ok(l) if len <= max => l.to_be_bytes(),
        _ => {
            buf.truncate(start);
            return Err(FrameError::TooLarge { len, max });
        }
    };
    buf[start..start + HEADER].copy_from_slice(&header);
    Ok(())
}

/// Receives frames from a [`quinn::RecvStream`].
pub struct FrameReader {
    stream: quinn::RecvStream,
    decoder: Decoder,
    chunks: Vec<Bytes>,
}

impl FrameReader {
    /// Wraps a receive stream with the default limit of [`DEFAULT_MAX_FRAME`].
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self::with_max_frame(stream, DEFAULT_MAX_FRAME)
    }

    /// Wraps a receive stream, rejecting frames whose payload exceeds `max` bytes.
    pub fn with_max_frame(stream: quinn::RecvStream, max: usize) -> Self {
        Self {
            stream,
            decoder: Decoder::new(max),
            chunks: vec![Bytes::new(); CHUNKS_PER_READ],
        }
    }

    /// Receives the next message. `Ok(None)` means the peer finished the stream cleanly
    /// after a complete frame.
    ///
    /// Cancel-safe: if the future is dropped (e.g. in `tokio::select!`), no data is lost
    /// and the next call continues where this one stopped.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(msg) = self.decoder.next_frame()? {
                return Ok(Some(msg));
            }
            match self.stream.read_chunks(&mut self.chunks).await? {
                Some(n) => {
                    for chunk in &mut self.chunks[..n] {
                        self.decoder.extend(chunk);
                        // Release the chunk now rather than at the next read.
                        *chunk = Bytes::new();
                    }
                }
                None => return self.decoder.finish().map(|()| None),
            }
        }
    }

    /// The largest payload this reader accepts.
    pub fn max_frame(&self) -> usize {
        self.decoder.max
    }

    /// Bytes received but not yet returned as a frame (e.g. to tell a large frame that is
    /// still arriving).
    pub fn buffered(&self) -> usize {
        self.decoder.buf.len()
    }

    /// Bytes currently allocated for buffering received data. Diagnostic: it shows that
    /// an oversize length prefix was rejected without allocating room for the frame.
    pub fn buffer_capacity(&self) -> usize {
        self.decoder.buf.capacity()
    }

    /// Whether the stream was opened with 0-RTT early data. Such data may be a replay:
    /// only idempotent messages may be acted on before the handshake completes.
    pub fn is_0rtt(&self) -> bool {
        self.stream.is_0rtt()
    }

    /// The underlying stream, e.g. to stop it.
    pub fn get_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }

    /// Unwraps the underlying stream. Bytes already buffered but not yet returned as a
    /// frame are discarded.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.stream
    }
}

/// Cuts a byte stream that arrives in `chunks` into frames exactly as a [`FrameReader`]
/// with limit `max` does, without a QUIC stream (for fuzzing and property tests of the
/// framing). Returns each frame's result in order: a [`FrameError::Malformed`] frame is
/// skipped and decoding goes on, as a reader's caller may; any other error ends the
/// stream. The end of input is checked like the end of a stream: input that stops inside
/// a frame ends with [`FrameError::Truncated`].
pub fn decode_frames<'a, T: DeserializeOwned>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    max: usize,
) -> Vec<Result<T, FrameError>> {
    let mut decoder = Decoder::new(max);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.extend(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(msg)) => out.push(Ok(msg)),
                Ok(None) => break,
                Err(e @ FrameError::Malformed(_)) => out.push(Err(e)),
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    if let Err(e) = decoder.finish() {
        out.push(Err(e));
    }
    out
}

/// The stream-independent part of [`FrameReader`]: a buffer of received bytes cut into
/// frames.
struct Decoder {
    buf: BytesMut,
    max: usize,
}

impl Decoder {
    fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    fn extend(&mut self, data: &[u8]) {
        // Grows with the data actually received, never with what a header claims, so a
        // peer that announces a large frame and then stalls only costs what it sent.
        self.buf.extend_from_slice(data);
    }

    /// The payload length of the buffered frame, if its header is complete.
    fn frame_len(&self) -> Result<Option<usize>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// Decodes the next complete frame, if one is buffered.
    fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.frame_len()? else {
            return Ok(None);
        };
        let Some(payload) = self.buf.get(HEADER..HEADER.saturating_add(len)) else {
            return Ok(None);
        };
        let decoded = codec::decode(payload, self.max);
        // Consume the frame even if it is malformed: its boundaries are known, so the
        // caller may choose to carry on with the next one.
        self.buf.advance(HEADER + len);
        if self.buf.is_empty() && self.buf.capacity() > RETAIN_LIMIT {
            self.buf = BytesMut::new();
        }
        decoded.map(Some).map_err(FrameError::Malformed)
    }

    /// Checks that the stream did not end inside a frame.
    fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let expected = match self.frame_len()? {
            Some(len) => HEADER.saturating_add(len),
            None => HEADER,
        };
        Err(FrameError::Truncated {
            expected,
            got: self.buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Msg {
        id: u64,
        body: String,
    }

    fn msg(id: u64) -> Msg {
        Msg {
            id,
            body: format!("message {id}"),
        }
    }

    fn frames(msgs: &[Msg]) -> Vec<u8> {
        let mut buf = Vec::new();
        for m in msgs {
            append_frame(&mut buf, m, DEFAULT_MAX_FRAME).unwrap();
        }
        buf
    }

    #[test]
    fn frames_survive_any_split_of_the_byte_stream() {
        let msgs: Vec<Msg> = (0..20).map(msg).collect();
        let bytes = frames(&msgs);
        for piece in [1, 2, 3, 4, 5, 7, 64, bytes.len()] {
            let mut d = Decoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for part in bytes.chunks(piece) {
                d.extend(part);
                while let Some(m) = d.next_frame::<Msg>().unwrap() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(got, msgs, "split into pieces of {piece}");
        }
    }

    #[test]
    fn header_is_big_endian_length() {
        let bytes = frames(&[msg(1)]);
        let payload = codec::encode(&msg(1)).unwrap();
        assert_eq!(&bytes[..4], &(payload.len() as u32).to_be_bytes());
        assert_eq!(&bytes[4..], &payload[..]);
    }

    #[test]
    fn oversize_header_is_rejected_without_allocating() {
        let mut d = Decoder::new(1024);
        d.extend(&u32::MAX.to_be_bytes());
        let err = d.next_frame::<Msg>().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize));
        assert!(err.is_malformed());
        assert!(d.buf.capacity() < 1024);
        // The error is sticky: the frame boundary is lost, so nothing further is decoded.
        assert!(matches!(
            d.next_frame::<Msg>(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn exactly_max_is_accepted_and_one_more_is_not() {
        let payload = codec::encode(&msg(7)).unwrap();
        let max = payload.len();
        let mut ok = Vec::new();
        append_frame(&mut ok, &msg(7), max).unwrap();
        let mut d = Decoder::new(max);
        d.extend(&ok);
        assert_eq!(d.next_frame::<Msg>().unwrap(), Some(msg(7)));

        let mut d = Decoder::new(max - 1);
        d.extend(&ok);
        assert!(matches!(
            d.next_frame::<Msg>(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn writer_side_refuses_oversize_and_leaves_buffer_clean() {
        let mut buf = vec![1, 2];
        let err = append_frame(&mut buf, &msg(1), 3).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 3, .. }));
        assert_eq!(buf, vec![1, 2]);
    }

    #[test]
    fn garbage_payload_is_malformed_and_skipped() {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        d.extend(&3u32.to_be_bytes());
        d.extend(&[0xff, 0xff, 0xff]);
        d.extend(&frames(&[msg(2)]));
        let err = d.next_frame::<Msg>().unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)) && err.is_malformed());
        assert_eq!(d.next_frame::<Msg>().unwrap(), Some(msg(2)));
    }

    #[test]
    fn truncation_is_detected_in_header_and_payload() {
        let bytes = frames(&[msg(3)]);
        for cut in 1..bytes.len() {
            let mut d = Decoder::new(DEFAULT_MAX_FRAME);
            d.extend(&bytes[..cut]);
            assert_eq!(d.next_frame::<Msg>().unwrap(), None);
            match d.finish() {
                Err(FrameError::Truncated { got, expected }) => {
                    assert_eq!(got, cut);
                    assert!(expected > got);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator is enough to walk through many shapes of input.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut d = Decoder::new(4096);
            let n = (x % 64) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.extend(&[(x & 0xff) as u8]);
            }
            while let Ok(Some(_)) = d.next_frame::<Msg>() {}
            let _ = d.finish();
        }
    }
}
