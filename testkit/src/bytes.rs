//! Edits of a binary encoding, as proptest strategies.

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flip bit `.1` of one byte.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Insert a byte.
    Insert(Index, u8),
    /// Delete a byte.
    Delete(Index),
    /// Cut the rest off.
    Truncate(Index),
    /// A LEB128 varint spliced in (how postcard writes lengths and integers): a lying
    /// length.
    Varint(Index, u64),
    /// A 4-byte big-endian length written over the bytes (e.g. frame headers).
    LengthBe(Index, u32),
    /// A 4-byte little-endian length written over the bytes (e.g. dump records).
    LengthLe(Index, u32),
}

/// The edits that need no knowledge of the format: bit flips, set, insert and delete
/// bytes, truncation.
pub fn plain() -> BoxedStrategy<Edit> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<Index>().prop_map(Edit::Delete),
        any::<Index>().prop_map(Edit::Truncate),
    ]
    .boxed()
}

/// [`plain`] edits plus varints from `values` spliced in.
pub fn with_varints(values: impl Strategy<Value = u64> + 'static) -> BoxedStrategy<Edit> {
    prop_oneof![
        plain(),
        (any::<Index>(), values).prop_map(|(i, v)| Edit::Varint(i, v)),
    ]
    .boxed()
}

/// Varint values that lie: the largest, powers that overflow 32 bits or sizes, small ones.
pub fn hostile_varints() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(1 << 32),
        Just(1 << 20),
        Just(0),
        Just(1),
        any::<u64>()
    ]
}

/// `edits`, applied in order to `bytes`; an edit that needs a byte to work on does
/// nothing to an empty string.
pub fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let n = bytes.len();
        match e {
            Edit::Flip(i, bit) if n > 0 => bytes[i.index(n)] ^= 1 << (bit % 8),
            Edit::Set(i, b) if n > 0 => bytes[i.index(n)] = *b,
            Edit::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            Edit::Delete(i) if n > 0 => {
                bytes.remove(i.index(n));
            }
            Edit::Truncate(i) => bytes.truncate(i.index(n + 1)),
            Edit::Varint(i, v) => {
                let at = i.index(n + 1);
                bytes.splice(at..at, varint(*v));
            }
            Edit::LengthBe(i, len) => overwrite(bytes, i, &len.to_be_bytes()),
            Edit::LengthLe(i, len) => overwrite(bytes, i, &len.to_le_bytes()),
            _ => {}
        }
    }
}

/// `v` as LEB128 (postcard's varint).
pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// `bytes` cut at `cuts` (each an index into `0..=len`), in order: the pieces a stream
/// may arrive in.
pub fn split<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Writes `with` over `bytes` from a point, growing them where it runs past the end.
fn overwrite(bytes: &mut Vec<u8>, at: &Index, with: &[u8]) {
    let n = bytes.len();
    let at = at.index(n + 1);
    let end = (at + with.len()).min(n);
    bytes.splice(at..end, with.iter().copied());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_leb128() {
        assert_eq!(varint(0), [0]);
        assert_eq!(varint(127), [127]);
        assert_eq!(varint(128), [0x80, 1]);
        assert_eq!(varint(u64::MAX).len(), 10);
    }

    #[test]
    fn lengths_overwrite_and_extend() {
        let mut b = vec![9u8; 6];
        let at = |i: usize, n: usize| {
            // An `Index` that lands on `i` of `n`.
            use proptest::strategy::ValueTree;
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            loop {
                let idx = any::<Index>().new_tree(&mut runner).unwrap().current();
                if idx.index(n) == i {
                    return idx;
                }
            }
        };
        apply(&mut b, &[Edit::LengthBe(at(4, 7), 0x0102_0304)]);
        assert_eq!(b, [9, 9, 9, 9, 1, 2, 3, 4]);
        apply(&mut b, &[Edit::LengthLe(at(0, 9), 1)]);
        assert_eq!(b, [1, 0, 0, 0, 1, 2, 3, 4]);
    }
}
