//! The only module that knows the binary encoding (bincode 2.0.1, serde mode).
//! Swapping the encoding means changing this file and nothing else.

use serde::{de::DeserializeOwned, Serialize};

/// Largest value [`decode`] will allocate for, whatever a length prefix inside claims.
pub const DECODE_LIMIT: usize = 64 * 1024 * 1024;

/// An encoding or decoding failure. Decoding errors mean malformed input.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (e.g. a map serializer without a known length).
    #[error("encode: {0}")]
    Encode(String),
    /// The bytes are not a valid encoding of the requested type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The bytes hold a valid value followed by this many unexpected bytes.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
}

impl CodecError {
    /// Whether the error was caused by the input bytes (as opposed to an unencodable value).
    pub fn is_malformed(&self) -> bool {
        matches!(self, CodecError::Decode(_) | CodecError::Trailing(_))
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encode a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encode a value, appending to `out`. On error `out` is left as it was.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    // Encode straight into the caller's buffer: the framing layer batches thousands of
    // small messages into one buffer, and an intermediate Vec per message would double
    // the allocations on that hot path.
    let start = out.len();
    match bincode::serde::encode_into_std_write(value, out, config()) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(start);
            Err(CodecError::Encode(e.to_string()))
        }
    }
}

/// Decode a value that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
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

    #[test]
    fn round_trip() {
        let m = Msg {
            a: 7,
            b: "x".into(),
            c: vec![1, 2, 3],
        };
        let bytes = encode(&m).unwrap();
        assert_eq!(decode::<Msg>(&bytes).unwrap(), m);
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
        assert_eq!(decode::<Msg>(&out[2..]).unwrap(), m);
    }

    #[test]
    fn failed_encode_into_leaves_buffer_untouched() {
        // bincode cannot encode a sequence whose length is unknown up front.
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
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0xff; 3][..],
            &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
        ] {
            assert!(decode::<Msg>(bytes).is_err());
        }
        let mut bytes = encode(&Msg {
            a: 1,
            b: "y".into(),
            c: vec![],
        })
        .unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Msg>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }
}
