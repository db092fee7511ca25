//! The only module that knows swarm's binary encoding.
//!
//! Everything swarm puts on a wire or a disk in binary — QUIC frames, Raft log entries,
//! Raft RPCs, state checkpoints, snapshots, backups, the memory store's snapshots — is
//! encoded here, with [postcard] 1.x (serde): a documented, stable format
//! (<https://postcard.jamesmunns.com/wire-format>) of varint integers and
//! length-prefixed sequences, in declaration order, with no self-description. Swapping
//! the encoding means changing this crate and bumping the format versions the callers
//! write next to their data.
//!
//! # Limits
//!
//! Every [`decode`] names the largest input it accepts. The limit is on the *input*:
//! postcard never allocates more than the input holds (a length prefix that claims more
//! than what is left is an error before any allocation of that size), so a decode uses
//! memory in proportion to its input, and unlike bincode 2 there is no budget summed over
//! the whole decode that a large but legitimate value can run out of.
//!
//! Types that go through here use only plain structs, enums, sequences, maps and
//! options: no `#[serde(flatten)]`, `untagged`, `skip_serializing_if` or
//! `serde_json::Value` (postcard is not self-describing).

use serde::{de::DeserializeOwned, Serialize};

/// The encoding's name and major version, for format descriptions and error messages.
pub const ENCODING: &str = "postcard 1";

/// An encoding or decoding failure. Decoding errors mean malformed input.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
    /// The bytes are not a valid encoding of the requested type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The bytes hold a valid value followed by this many unexpected bytes.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// The input is larger than the caller's limit for this kind of message.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

impl CodecError {
    /// Whether the error was caused by the input bytes (as opposed to an unencodable value).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, CodecError::Encode(_))
    }
}

/// Encode a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encode a value, appending to `out`. On error `out` is left as it was.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    // Straight into the caller's buffer: the framing layer batches thousands of small
    // messages into one buffer, and an intermediate Vec per message would double the
    // allocations on that hot path.
    let start = out.len();
    postcard::serialize_with_flavor(value, AppendTo(out)).map_err(|e| {
        out.truncate(start);
        CodecError::Encode(e.to_string())
    })
}

/// A postcard output that appends to a borrowed buffer.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The number of bytes [`encode`] would produce, without allocating them.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    postcard::experimental::serialized_size(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decode a value that must fill `bytes` exactly; inputs over `limit` bytes are refused
/// before anything is decoded.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| CodecError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Msg {
        a: u64,
        b: String,
        c: Vec<u8>,
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn round_trip() {
        let m = Msg {
            a: 7,
            b: "x".into(),
            c: vec![1, 2, 3],
        };
        let bytes = encode(&m).unwrap();
        assert_eq!(encoded_len(&m).unwrap(), bytes.len());
        assert_eq!(decode::<Msg>(&bytes, MIB).unwrap(), m);
    }

    #[test]
    fn encode_into_appends_and_matches_encode() {
        let m = Msg {
            a: 1 << 40,
            b: "hello".into(),
            c: vec![9; 10],
        };
        let mut out = vec![0xaa, 0xbb];
        encode_into(&m, &mut out).unwrap();
        assert_eq!(&out[..2], &[0xaa, 0xbb]);
        assert_eq!(&out[2..], &encode(&m).unwrap()[..]);
        assert_eq!(decode::<Msg>(&out[2..], MIB).unwrap(), m);
    }

    #[test]
    fn failed_encode_into_leaves_buffer_untouched() {
        // A sequence whose length is unknown up front cannot be encoded.
        struct Unsized;
        impl serde::Serialize for Unsized {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let mut seq = s.serialize_seq(None)?;
                seq.serialize_element(&1u8)?;
                seq.end()
            }
        }
        let mut out = vec![1, 2, 3];
        let err = encode_into(&Unsized, &mut out).unwrap_err();
        assert!(!err.is_malformed());
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn the_limit_is_on_the_input_and_nothing_else() {
        // The bincode 2 failure that stranded data: a value far larger than the limit's
        // share per field (millions of small integers) must decode when its bytes fit.
        let big: Vec<u64> = (0..10_000_000u64).map(|i| i % 100).collect();
        let bytes = encode(&big).unwrap();
        assert!(bytes.len() < 11 * MIB, "varints: {} bytes", bytes.len());
        assert_eq!(decode::<Vec<u64>>(&bytes, 11 * MIB).unwrap(), big);
        assert!(matches!(
            decode::<Vec<u64>>(&bytes, MIB),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn lying_length_prefixes_do_not_allocate() {
        // A byte string claiming 2^60 bytes in a 12-byte input.
        let mut bytes = vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(decode::<Vec<u8>>(&bytes, MIB).is_err());
        assert!(decode::<Vec<String>>(&bytes, MIB).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0xff; 3][..],
            &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
        ] {
            assert!(decode::<Msg>(bytes, MIB).is_err());
        }
        let mut bytes = encode(&Msg {
            a: 1,
            b: "y".into(),
            c: vec![],
        })
        .unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Msg>(&bytes, MIB),
            Err(CodecError::Trailing(1))
        ));
    }
}
