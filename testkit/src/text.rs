//! Edits of a text (JSON bodies, TOML files), as proptest strategies.

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of a text, by characters.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Delete a character.
    Delete(Index),
    /// Insert a character.
    Insert(Index, char),
    /// Cut the rest off.
    Truncate(Index),
    /// Copy a slice of up to 49 characters elsewhere (repeated keys, nested bodies).
    Duplicate(Index, Index),
}

/// Edits inserting `special` characters (the ones the format's parser trips on) or any
/// other, deleting, truncating and duplicating.
pub fn edits(special: &[char]) -> BoxedStrategy<Edit> {
    let special = prop::sample::select(special.to_vec());
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), prop_oneof![special, any::<char>()]).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Duplicate(a, b)),
    ]
    .boxed()
}

/// `text` with `edits` applied in order.
pub fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len();
        match e {
            Edit::Delete(i) if n > 0 => {
                chars.remove(i.index(n));
            }
            Edit::Insert(i, c) => chars.insert(i.index(n + 1), *c),
            Edit::Truncate(i) => chars.truncate(i.index(n + 1)),
            Edit::Duplicate(a, b) if n > 0 => {
                let (x, y) = (a.index(n), b.index(n));
                let (lo, hi) = (x.min(y), x.max(y));
                let piece: Vec<char> = chars[lo..=hi.min(lo + 48)].to_vec();
                let at = b.index(n + 1);
                chars.splice(at..at, piece);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}
