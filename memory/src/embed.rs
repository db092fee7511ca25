//! Text embeddings behind the [`Embedder`] trait: a deterministic offline hashing
//! embedder and an HTTP client for OpenAI-compatible `/v1/embeddings` endpoints.
//! (Callers that already have vectors pass them directly; the store validates them.)

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{MemoryError, Result};

/// A boxed, sendable future (keeps [`Embedder`] object-safe without `async-trait`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Default dimension of [`HashEmbedder`] (and of the pattern bank).
pub const DEFAULT_HASH_DIMENSION: usize = 256;

/// Turns texts into vectors.
pub trait Embedder: Send + Sync {
    /// Dimension of every vector returned.
    fn dimension(&self) -> usize;
    /// Embeds each text; the result has one vector per input, in order.
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>>>;
}

/// FNV-1a 64 followed by a SplitMix64 finaliser: stable across platforms, processes and
/// Rust versions (unlike `std`'s randomly seeded hasher), with well-mixed bits.
fn stable_hash(tag: u8, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(tag);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            eat(0x1f);
        }
        for b in p.bytes() {
            eat(b);
        }
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic offline embedder: signed feature hashing of word unigrams, word bigrams
/// and character 3-grams (of each word padded with `^`/`$`) into a fixed dimension, then
/// L2 normalisation. Identical output on every platform and process. Captures lexical
/// overlap and morphology, not meaning; use [`HttpEmbedder`] for semantic embeddings.
#[derive(Debug, Clone)]
pub struct HashEmbedder {
    dimension: usize,
    w_unigram: f32,
    w_bigram: f32,
    w_trigram: f32,
}

impl Default for HashEmbedder {
    fn default() -> Self {
        HashEmbedder::new(DEFAULT_HASH_DIMENSION)
    }
}

impl HashEmbedder {
    /// A hashing embedder of the given dimension (clamped to at least 8).
    pub fn new(dimension: usize) -> Self {
        HashEmbedder {
            dimension: dimension.max(8),
            w_unigram: 1.0,
            w_bigram: 0.7,
            w_trigram: 0.35,
        }
    }

    fn add(&self, v: &mut [f32], h: u64, w: f32) {
        let idx = (h % self.dimension as u64) as usize;
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        v[idx] += sign * w;
    }

    /// Embeds one text synchronously. Never fails; the empty text maps to a fixed unit
    /// vector.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dimension];
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            self.add(&mut v, stable_hash(0, &[""]), 1.0);
        }
        for w in &words {
            self.add(&mut v, stable_hash(b'u', &[w]), self.w_unigram);
            let chars: Vec<char> = std::iter::once('^')
                .chain(w.chars())
                .chain(std::iter::once('$'))
                .collect();
            let mut buf = String::new();
            for tri in chars.windows(3) {
                buf.clear();
                buf.extend(tri);
                self.add(&mut v, stable_hash(b'c', &[&buf]), self.w_trigram);
            }
        }
        for pair in words.windows(2) {
            self.add(
                &mut v,
                stable_hash(b'b', &[pair[0], pair[1]]),
                self.w_bigram,
            );
        }
        let norm = v
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 {
            // Every feature cancelled out (possible with signed hashing): fall back to the
            // empty-text direction so the vector stays valid under cosine.
            v[(stable_hash(0, &[""]) % self.dimension as u64) as usize] = 1.0;
            return v;
        }
        v.iter().map(|x| (*x as f64 / norm) as f32).collect()
    }
}

impl Embedder for HashEmbedder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>>> {
        let out = texts.iter().map(|t| self.embed_one(t)).collect();
        Box::pin(std::future::ready(Ok(out)))
    }
}

/// Settings of [`HttpEmbedder`].
#[derive(Debug, Clone)]
pub struct HttpEmbedderConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080` or `http://host/v1`; `/v1/embeddings` is
    /// appended as needed. (`https` needs the crate feature `https`, which the coordinator
    /// enables: rustls with the ring provider and the bundled Mozilla roots.)
    pub base_url: String,
    /// Model name sent in the request.
    pub model: String,
    /// Bearer token, if the server wants one.
    pub api_key: Option<String>,
    /// Expected dimension; responses of another dimension are rejected.
    pub dimension: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Most texts per request; longer inputs are split.
    pub max_batch: usize,
}

impl HttpEmbedderConfig {
    /// Config with a 30 s timeout, batches of 64 and no API key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, dimension: usize) -> Self {
        HttpEmbedderConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            dimension,
            timeout: Duration::from_secs(30),
            max_batch: 64,
        }
    }
}

/// Builds `{base}/v1/<path>` from a base URL that may or may not already end in `/v1`.
pub(crate) fn openai_endpoint(base_url: &str, path: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/v1/{path}")
}

pub(crate) fn snippet(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Client for an OpenAI-compatible embeddings endpoint (`POST /v1/embeddings` with
/// `{"model", "input": [..]}`, answer `{"data": [{"index", "embedding"}]}`).
#[derive(Debug, Clone)]
pub struct HttpEmbedder {
    client: reqwest::Client,
    endpoint: String,
    cfg: HttpEmbedderConfig,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingDatum>,
}

#[derive(Deserialize)]
struct EmbeddingDatum {
    embedding: Vec<f32>,
    #[serde(default)]
    index: Option<usize>,
}

impl HttpEmbedder {
    /// A client for the configured endpoint.
    pub fn new(cfg: HttpEmbedderConfig) -> Result<Self> {
        if cfg.dimension == 0 || cfg.max_batch == 0 {
            return Err(MemoryError::InvalidParams(
                "embedder dimension and max_batch must be positive".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| MemoryError::Embedding(format!("cannot build HTTP client: {e}")))?;
        Ok(HttpEmbedder {
            client,
            endpoint: openai_endpoint(&cfg.base_url, "embeddings"),
            cfg,
        })
    }

    /// The full endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let body = serde_json::json!({ "model": self.cfg.model, "input": texts });
        let mut req = self.client.post(&self.endpoint).json(&body);
        if let Some(key) = &self.cfg.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| MemoryError::Embedding(format!("POST {}: {e}", self.endpoint)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| MemoryError::Embedding(format!("reading response: {e}")))?;
        if !status.is_success() {
            return Err(MemoryError::Embedding(format!(
                "HTTP {status}: {}",
                snippet(&text)
            )));
        }
        let parsed: EmbeddingsResponse = serde_json::from_str(&text).map_err(|e| {
            MemoryError::Embedding(format!("bad response JSON ({e}): {}", snippet(&text)))
        })?;
        if parsed.data.len() != texts.len() {
            return Err(MemoryError::Embedding(format!(
                "asked for {} embeddings, got {}",
                texts.len(),
                parsed.data.len()
            )));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for (pos, d) in parsed.data.into_iter().enumerate() {
            let i = d.index.unwrap_or(pos);
            if i >= out.len() || out[i].is_some() {
                return Err(MemoryError::Embedding(format!(
                    "bad or duplicate index {i}"
                )));
            }
            if d.embedding.len() != self.cfg.dimension {
                return Err(MemoryError::Embedding(format!(
                    "expected dimension {}, got {}",
                    self.cfg.dimension,
                    d.embedding.len()
                )));
            }
            if d.embedding.iter().any(|x| !x.is_finite()) {
                return Err(MemoryError::Embedding("non-finite component".into()));
            }
            out[i] = Some(d.embedding);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl Embedder for HttpEmbedder {
    fn dimension(&self) -> usize {
        self.cfg.dimension
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(self.cfg.max_batch) {
                out.extend(self.embed_batch(chunk).await?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::dot;

    #[test]
    fn hash_embedder_is_deterministic_and_normalised() {
        let e = HashEmbedder::default();
        let a = e.embed_one("Retry the flaky network call with exponential backoff");
        assert_eq!(
            a,
            e.embed_one("Retry the flaky network call with exponential backoff")
        );
        assert_eq!(a.len(), 256);
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        let empty = e.embed_one("");
        assert!((dot(&empty, &empty) - 1.0).abs() < 1e-5);
        assert_eq!(empty, e.embed_one("  ,;  "));
    }

    #[test]
    fn hash_embedder_pins_known_values() {
        // Guards cross-platform/process stability: these values were computed by an
        // independent implementation (FNV-1a 64 + SplitMix64 finaliser) and must never
        // change, or stored pattern embeddings would stop matching new queries.
        assert_eq!(stable_hash(b'u', &["rust"]), 0xa1b6_a860_ad52_ceb5);
        assert_eq!(
            stable_hash(b'b', &["hello", "world"]),
            0x5558_c49c_17ba_cbfb
        );
        let expected = [
            -0.210295, 0.0, -0.600842, 0.210295, -0.210295, 0.0, 0.210295, 0.390547, 0.0, 0.0,
            -0.210295, 0.210295, 0.0, -0.420589, 0.0, -0.210295,
        ];
        let v = HashEmbedder::new(16).embed_one("hello world");
        for (got, want) in v.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{v:?}");
        }
        assert_eq!(
            v,
            HashEmbedder::new(16).embed_one("HELLO, world!"),
            "case and punctuation are ignored"
        );
    }

    #[test]
    fn similar_texts_are_closer_than_unrelated() {
        let e = HashEmbedder::default();
        let a = e.embed_one("compile the rust crate with cargo build in release mode");
        let b = e.embed_one("build the rust crates using cargo in release mode");
        let c = e.embed_one("the quarterly marketing budget meeting moved to friday");
        assert!(
            dot(&a, &b) > dot(&a, &c) + 0.2,
            "{} vs {}",
            dot(&a, &b),
            dot(&a, &c)
        );
    }

    #[test]
    fn endpoint_building() {
        assert_eq!(
            openai_endpoint("http://h:1", "embeddings"),
            "http://h:1/v1/embeddings"
        );
        assert_eq!(
            openai_endpoint("http://h:1/v1/", "embeddings"),
            "http://h:1/v1/embeddings"
        );
    }
}
