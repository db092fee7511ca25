//! Item metadata (a JSON object stored as canonical text) and metadata filters.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{MemoryError, Result};

/// Parsed metadata object.
pub(crate) type MetaMap = Map<String, Value>;

/// Validates metadata text and returns its canonical (compact) form and parsed object.
///
/// An empty string means "no metadata" and becomes `{}`. Anything else must be a JSON
/// object whose text, both as given and re-serialised, fits in `limit` bytes.
pub(crate) fn canonicalize(text: &str, limit: usize) -> Result<(String, MetaMap)> {
    if text.len() > limit {
        return Err(MemoryError::MetadataTooLarge {
            size: text.len(),
            limit,
        });
    }
    if text.trim().is_empty() {
        return Ok(("{}".to_string(), Map::new()));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| MemoryError::InvalidMetadata(format!("not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(MemoryError::InvalidMetadata(format!(
            "must be a JSON object, got {}",
            json_kind(&value)
        )));
    };
    let canonical = serde_json::to_string(&map)
        .map_err(|e| MemoryError::InvalidMetadata(format!("cannot re-encode: {e}")))?;
    if canonical.len() > limit {
        return Err(MemoryError::MetadataTooLarge {
            size: canonical.len(),
            limit,
        });
    }
    Ok((canonical, map))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A scalar JSON value a filter compares against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// JSON `null`.
    Null,
    /// JSON `true`/`false`.
    Bool(bool),
    /// An integer (compared numerically with floats: `1 == 1.0`).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (exact, case-sensitive).
    Str(String),
}

impl Scalar {
    fn from_json(v: &Value) -> Option<Scalar> {
        Some(match v {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Scalar::Int(i)
                } else {
                    Scalar::Float(n.as_f64()?)
                }
            }
            Value::String(s) => Scalar::Str(s.clone()),
            Value::Array(_) | Value::Object(_) => return None,
        })
    }

    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Scalar::Null, Value::Null) => true,
            (Scalar::Bool(a), Value::Bool(b)) => a == b,
            (Scalar::Str(a), Value::String(b)) => a == b,
            (Scalar::Int(a), Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    *a == i
                } else if n.is_u64() {
                    false // above i64::MAX, cannot equal an i64
                } else {
                    n.as_f64() == Some(*a as f64)
                }
            }
            (Scalar::Float(a), Value::Number(n)) => n.as_f64() == Some(*a),
            _ => false,
        }
    }
}

/// One condition on a top-level metadata field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// The field exists and equals the value.
    Eq {
        /// Top-level field name.
        field: String,
        /// Value to compare with.
        value: Scalar,
    },
    /// The field exists and equals one of the values.
    In {
        /// Top-level field name.
        field: String,
        /// Accepted values.
        values: Vec<Scalar>,
    },
    /// The field exists (with any value, including `null`).
    Exists {
        /// Top-level field name.
        field: String,
    },
}

impl Condition {
    fn field(&self) -> &str {
        match self {
            Condition::Eq { field, .. }
            | Condition::In { field, .. }
            | Condition::Exists { field } => field,
        }
    }

    fn matches(&self, meta: &MetaMap) -> bool {
        let Some(v) = meta.get(self.field()) else {
            return false;
        };
        match self {
            Condition::Eq { value, .. } => value.matches(v),
            Condition::In { values, .. } => values.iter().any(|s| s.matches(v)),
            Condition::Exists { .. } => true,
        }
    }
}

/// A metadata filter: all conditions must hold ("all-of"). The empty filter matches
/// everything. Evaluated during the HNSW search, not only afterwards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetadataFilter {
    /// Conditions that must all hold.
    pub all: Vec<Condition>,
}

/// Most conditions in one filter.
pub const MAX_FILTER_CONDITIONS: usize = 64;
/// Most values in one `In` condition.
pub const MAX_FILTER_VALUES: usize = 1024;

impl MetadataFilter {
    /// A filter with the given conditions.
    pub fn all_of(conditions: Vec<Condition>) -> Self {
        MetadataFilter { all: conditions }
    }

    /// Shorthand for a one-condition equality filter.
    pub fn eq(field: impl Into<String>, value: Scalar) -> Self {
        MetadataFilter {
            all: vec![Condition::Eq {
                field: field.into(),
                value,
            }],
        }
    }

    /// Parses the JSON filter form used over HTTP: an object whose keys are top-level
    /// field names and whose values are either a scalar (equality), an array of scalars
    /// (one of), or `{"$exists": true}`. Example: `{"lang": "rust", "tier": [1, 2]}`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(MemoryError::InvalidFilter(format!(
                "filter must be a JSON object, got {}",
                json_kind(value)
            )));
        };
        let mut all = Vec::with_capacity(map.len());
        for (field, v) in map {
            let cond = match v {
                Value::Array(items) => {
                    let values = items
                        .iter()
                        .map(|i| {
                            Scalar::from_json(i).ok_or_else(|| {
                                MemoryError::InvalidFilter(format!(
                                    "field `{field}`: array values must be scalars"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Condition::In {
                        field: field.clone(),
                        values,
                    }
                }
                Value::Object(o) => {
                    if o.len() == 1 && o.get("$exists") == Some(&Value::Bool(true)) {
                        Condition::Exists {
                            field: field.clone(),
                        }
                    } else {
                        return Err(MemoryError::InvalidFilter(format!(
                            "field `{field}`: the only object form is {{\"$exists\": true}}"
                        )));
                    }
                }
                scalar => Condition::Eq {
                    field: field.clone(),
                    value: Scalar::from_json(scalar).ok_or_else(|| {
                        MemoryError::InvalidFilter(format!("field `{field}`: unsupported value"))
                    })?,
                },
            };
            all.push(cond);
        }
        let f = MetadataFilter { all };
        f.validate()?;
        Ok(f)
    }

    /// Checks sizes and values (no NaN floats, no empty field names).
    pub fn validate(&self) -> Result<()> {
        if self.all.len() > MAX_FILTER_CONDITIONS {
            return Err(MemoryError::InvalidFilter(format!(
                "{} conditions, at most {MAX_FILTER_CONDITIONS}",
                self.all.len()
            )));
        }
        for c in &self.all {
            if c.field().is_empty() {
                return Err(MemoryError::InvalidFilter("empty field name".into()));
            }
            let scalars: &[Scalar] = match c {
                Condition::Eq { value, .. } => std::slice::from_ref(value),
                Condition::In { values, .. } => {
                    if values.len() > MAX_FILTER_VALUES {
                        return Err(MemoryError::InvalidFilter(format!(
                            "field `{}`: {} values, at most {MAX_FILTER_VALUES}",
                            c.field(),
                            values.len()
                        )));
                    }
                    values
                }
                Condition::Exists { .. } => &[],
            };
            if scalars
                .iter()
                .any(|s| matches!(s, Scalar::Float(f) if !f.is_finite()))
            {
                return Err(MemoryError::InvalidFilter(format!(
                    "field `{}`: non-finite number",
                    c.field()
                )));
            }
        }
        Ok(())
    }

    /// Whether a parsed metadata object satisfies every condition.
    pub(crate) fn matches(&self, meta: &MetaMap) -> bool {
        self.all.iter().all(|c| c.matches(meta))
    }

    /// Whether a metadata JSON text satisfies every condition (false if it does not parse).
    pub fn matches_json(&self, metadata: &str) -> bool {
        match serde_json::from_str::<Value>(metadata) {
            Ok(Value::Object(m)) => self.matches(&m),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalize_validates_and_compacts() {
        let (c, m) = canonicalize(r#"{ "b": 1, "a": [true, null] }"#, 100).unwrap();
        assert!(!c.contains(' '));
        assert_eq!(m.len(), 2);
        assert_eq!(canonicalize("", 10).unwrap().0, "{}");
        assert_eq!(
            canonicalize("[1]", 10).unwrap_err().code(),
            "invalid_metadata"
        );
        assert_eq!(
            canonicalize("{", 10).unwrap_err().code(),
            "invalid_metadata"
        );
        assert_eq!(
            canonicalize(r#"{"a":"0123456789"}"#, 10)
                .unwrap_err()
                .code(),
            "metadata_too_large"
        );
    }

    #[test]
    fn filter_semantics() {
        let meta: MetaMap =
            serde_json::from_str(r#"{"lang":"rust","n":2,"x":1.5,"z":null}"#).unwrap();
        let f =
            MetadataFilter::from_json(&serde_json::json!({"lang": "rust", "n": [1, 2.0]})).unwrap();
        assert!(f.matches(&meta));
        let f = MetadataFilter::from_json(&serde_json::json!({"lang": "go"})).unwrap();
        assert!(!f.matches(&meta));
        let f = MetadataFilter::from_json(&serde_json::json!({"z": {"$exists": true}, "x": 1.5}))
            .unwrap();
        assert!(f.matches(&meta));
        let f = MetadataFilter::from_json(&serde_json::json!({"missing": null})).unwrap();
        assert!(!f.matches(&meta));
        assert!(MetadataFilter::default().matches(&meta));
        assert_eq!(
            MetadataFilter::from_json(&serde_json::json!([1]))
                .unwrap_err()
                .code(),
            "invalid_filter"
        );
        assert_eq!(
            MetadataFilter::from_json(&serde_json::json!({"a": {"b": 1}}))
                .unwrap_err()
                .code(),
            "invalid_filter"
        );
        assert_eq!(
            MetadataFilter::eq("a", Scalar::Float(f64::NAN))
                .validate()
                .unwrap_err()
                .code(),
            "invalid_filter"
        );
    }
}
