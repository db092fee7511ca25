//! The error type of the crate, with stable machine-readable codes.

use thiserror::Error;

/// Everything that can go wrong in `swarm-memory`.
///
/// Every variant maps to a stable string code ([`MemoryError::code`]) that an HTTP layer
/// can return to clients and match on; the `Display` text is for humans and may change.
/// [`MemoryError::is_client_error`] tells whether the caller sent something invalid (a
/// 4xx in HTTP terms) or whether something failed on our side or upstream (5xx).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MemoryError {
    /// No collection with that name exists.
    #[error("unknown collection `{0}`")]
    UnknownCollection(String),
    /// A collection with that name already exists.
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    /// The collection name is empty, too long, uses forbidden characters or is reserved.
    #[error("invalid collection name `{name}`: {reason}")]
    InvalidCollectionName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The dimension asked for at collection creation is 0 or above the configured limit.
    #[error("invalid dimension {dimension}: must be between 1 and {max}")]
    InvalidDimension {
        /// The requested dimension.
        dimension: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A vector does not have the collection's dimension.
    #[error("dimension mismatch: expected {expected}, got {got}")]
    DimensionMismatch {
        /// The collection's dimension.
        expected: usize,
        /// The length of the vector supplied.
        got: usize,
    },
    /// A vector has NaN/infinite components, overflows, or is zero under the cosine metric.
    #[error("invalid vector: {0}")]
    InvalidVector(String),
    /// The metadata JSON is larger than the configured limit.
    #[error("metadata is {size} bytes, limit is {limit}")]
    MetadataTooLarge {
        /// Size of the metadata text in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The metadata is not valid JSON or not a JSON object.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// An item id is empty, too long or contains control characters.
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// The same id appears twice in one batch.
    #[error("duplicate id `{0}` in one batch")]
    DuplicateId(String),
    /// `k` is 0 or above the configured maximum.
    #[error("invalid k {k}: must be between 1 and {max}")]
    InvalidK {
        /// The requested k.
        k: usize,
        /// The configured maximum.
        max: usize,
    },
    /// `ef` is 0 or above the configured maximum.
    #[error("invalid ef {ef}: must be between 1 and {max}")]
    InvalidEf {
        /// The requested ef.
        ef: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A TTL of zero.
    #[error("invalid ttl: {0}")]
    InvalidTtl(String),
    /// A metadata filter that cannot be evaluated.
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    /// Index, retrieval, consolidation or store parameters out of range.
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// A pattern (ReasoningBank item) with missing or oversize fields.
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
    /// A batch is larger than the configured limit.
    #[error("batch of {size} exceeds the limit of {limit}")]
    BatchTooLarge {
        /// Number of entries in the batch.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A snapshot could not be decoded or is of an unsupported format version.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// Encoding a snapshot failed.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// An embedding backend failed or returned something unusable.
    #[error("embedding failed: {0}")]
    Embedding(String),
    /// A distiller (agent items, LLM) failed or returned something unusable.
    #[error("distillation failed: {0}")]
    Distill(String),
}

impl MemoryError {
    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            MemoryError::UnknownCollection(_) => "unknown_collection",
            MemoryError::CollectionExists(_) => "collection_exists",
            MemoryError::InvalidCollectionName { .. } => "invalid_collection_name",
            MemoryError::InvalidDimension { .. } => "invalid_dimension",
            MemoryError::DimensionMismatch { .. } => "dimension_mismatch",
            MemoryError::InvalidVector(_) => "invalid_vector",
            MemoryError::MetadataTooLarge { .. } => "metadata_too_large",
            MemoryError::InvalidMetadata(_) => "invalid_metadata",
            MemoryError::InvalidId(_) => "invalid_id",
            MemoryError::DuplicateId(_) => "duplicate_id",
            MemoryError::InvalidK { .. } => "invalid_k",
            MemoryError::InvalidEf { .. } => "invalid_ef",
            MemoryError::InvalidTtl(_) => "invalid_ttl",
            MemoryError::InvalidFilter(_) => "invalid_filter",
            MemoryError::InvalidParams(_) => "invalid_params",
            MemoryError::InvalidPattern(_) => "invalid_pattern",
            MemoryError::BatchTooLarge { .. } => "batch_too_large",
            MemoryError::InvalidSnapshot(_) => "invalid_snapshot",
            MemoryError::Encode(_) => "encode_failed",
            MemoryError::Embedding(_) => "embedding_failed",
            MemoryError::Distill(_) => "distill_failed",
        }
    }

    /// True if the caller sent something invalid (map to HTTP 4xx; `unknown_collection`
    /// to 404 and `collection_exists` to 409), false if the failure is ours or upstream's.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            MemoryError::InvalidSnapshot(_)
                | MemoryError::Encode(_)
                | MemoryError::Embedding(_)
                | MemoryError::Distill(_)
        )
    }

    /// Every code this crate can return, for documentation and exhaustive mapping tests.
    pub const ALL_CODES: &'static [&'static str] = &[
        "unknown_collection",
        "collection_exists",
        "invalid_collection_name",
        "invalid_dimension",
        "dimension_mismatch",
        "invalid_vector",
        "metadata_too_large",
        "invalid_metadata",
        "invalid_id",
        "duplicate_id",
        "invalid_k",
        "invalid_ef",
        "invalid_ttl",
        "invalid_filter",
        "invalid_params",
        "invalid_pattern",
        "batch_too_large",
        "invalid_snapshot",
        "encode_failed",
        "embedding_failed",
        "distill_failed",
    ];
}

/// Shorthand for results in this crate.
pub type Result<T, E = MemoryError> = std::result::Result<T, E>;
