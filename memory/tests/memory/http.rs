//! HTTP embedder and LLM distiller against a real local mock server (tokio TCP,
//! hand-written HTTP/1.1).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use swarm_memory::{
    embed_items, Distiller, Embedder, HttpEmbedder, HttpEmbedderConfig, LlmDistiller,
    LlmDistillerConfig, Outcome, TaskSummary,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Handler = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

/// Starts a mock HTTP server on 127.0.0.1; returns its base URL and the requests it saw.
async fn mock_server(handler: Handler) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let header_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap().split(' ');
                let method = first.next().unwrap().to_string();
                let path = first.next().unwrap().to_string();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < header_end + len {
                    let n = sock.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = serde_json::from_slice(&buf[header_end..header_end + len])
                    .unwrap_or(Value::Null);
                let req = Seen {
                    method,
                    path,
                    headers,
                    body,
                };
                let (status, resp) = handler(&req);
                log.lock().unwrap().push(req);
                let out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{resp}",
                    resp.len()
                );
                sock.write_all(out.as_bytes()).await.unwrap();
                sock.shutdown().await.ok();
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// Embeds each input as [len, index-in-batch, 1], answering in reverse order.
fn embeddings_handler() -> Handler {
    Arc::new(|req: &Seen| {
        let inputs = req.body["input"].as_array().cloned().unwrap_or_default();
        let mut data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.as_str().unwrap().len() as f32, i as f32, 1.0]}))
            .collect();
        data.reverse();
        (
            200,
            json!({"object": "list", "data": data, "model": req.body["model"]}).to_string(),
        )
    })
}

#[tokio::test]
async fn http_embedder_talks_openai_embeddings() {
    let (url, seen) = mock_server(embeddings_handler()).await;
    let mut cfg = HttpEmbedderConfig::new(format!("{url}/v1/"), "text-embed-test", 3);
    cfg.api_key = Some("sk-test".into());
    cfg.max_batch = 2;
    let e = HttpEmbedder::new(cfg).unwrap();
    assert_eq!(e.endpoint(), format!("{url}/v1/embeddings"));
    assert_eq!(e.dimension(), 3);
    let texts: Vec<String> = ["a", "bb", "ccc", "dddd", "eeeee"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = e.embed(&texts).await.unwrap();
    assert_eq!(out.len(), 5);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(v[0], (i + 1) as f32, "answers reordered by index");
        assert_eq!(v[1], (i % 2) as f32);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "batches of 2");
    assert!(seen
        .iter()
        .all(|r| r.method == "POST" && r.path == "/v1/embeddings"));
    assert_eq!(seen[0].body["model"], "text-embed-test");
    assert_eq!(seen[0].body["input"], json!(["a", "bb"]));
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk-test"));
    assert!(e.embed(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn http_embedder_reports_failures() {
    let err_code = |r: Result<Vec<Vec<f32>>, swarm_memory::MemoryError>| {
        let e = r.unwrap_err();
        (e.code(), e.to_string())
    };
    let texts = vec!["x".to_string()];
    // Wrong dimension.
    let (url, _) = mock_server(embeddings_handler()).await;
    let e = HttpEmbedder::new(HttpEmbedderConfig::new(url, "m", 4)).unwrap();
    let (code, msg) = err_code(e.embed(&texts).await);
    assert_eq!(code, "embedding_failed");
    assert!(msg.contains("dimension"), "{msg}");
    // Server error status.
    let (url, _) = mock_server(Arc::new(|_: &Seen| {
        (500, r#"{"error":"overloaded"}"#.to_string())
    }))
    .await;
    let e = HttpEmbedder::new(HttpEmbedderConfig::new(url, "m", 3)).unwrap();
    let (code, msg) = err_code(e.embed(&texts).await);
    assert_eq!(code, "embedding_failed");
    assert!(msg.contains("500") && msg.contains("overloaded"), "{msg}");
    // Garbage body.
    let (url, _) = mock_server(Arc::new(|_: &Seen| (200, "not json".to_string()))).await;
    let e = HttpEmbedder::new(HttpEmbedderConfig::new(url, "m", 3)).unwrap();
    assert_eq!(err_code(e.embed(&texts).await).0, "embedding_failed");
    // Wrong count.
    let (url, _) = mock_server(Arc::new(|_: &Seen| (200, r#"{"data":[]}"#.to_string()))).await;
    let e = HttpEmbedder::new(HttpEmbedderConfig::new(url, "m", 3)).unwrap();
    assert_eq!(err_code(e.embed(&texts).await).0, "embedding_failed");
    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = HttpEmbedderConfig::new(format!("http://127.0.0.1:{port}"), "m", 3);
    cfg.timeout = Duration::from_secs(5);
    let e = HttpEmbedder::new(cfg).unwrap();
    assert_eq!(err_code(e.embed(&texts).await).0, "embedding_failed");
}

fn failed_task() -> TaskSummary {
    TaskSummary {
        task_id: 42,
        agent: "deployer".into(),
        payload_summary: "deploy api to staging".into(),
        outcome: Outcome::Failure,
        error: Some("permission denied: /var/run/docker.sock".into()),
        result: Some(json!({"exit_code": 1})),
    }
}

#[tokio::test]
async fn llm_distiller_parses_chat_completion() {
    let reply = "Sure.\n```json\n{\"memory_items\": [\
        {\"title\": \"Check docker socket access\", \"description\": \"Deploys need docker group\", \
         \"content\": \"Add the deploy user to the docker group before deploying.\", \"outcome\": \"failure\"},\
        {\"title\": \"Second\", \"content\": \"More\"}]}\n```";
    let handler: Handler = Arc::new(move |_: &Seen| {
        (200, json!({"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).to_string())
    });
    let (url, seen) = mock_server(handler).await;
    let mut cfg = LlmDistillerConfig::new(url.clone(), "tiny-llm");
    cfg.api_key = Some("k".into());
    let d = LlmDistiller::new(cfg).unwrap();
    assert_eq!(d.endpoint(), format!("{url}/v1/chat/completions"));
    let task = failed_task();
    let items = d.distill(&task).await.unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].title, "Check docker socket access");
    assert_eq!(items[0].outcome, Outcome::Failure);
    assert_eq!(
        items[1].outcome,
        Outcome::Failure,
        "defaults to the task outcome"
    );
    assert!(items.iter().all(|i| i.source_task == Some(42)));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].body["model"], "tiny-llm");
    assert_eq!(seen[0].header("authorization"), Some("Bearer k"));
    let msgs = seen[0].body["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "system");
    assert!(msgs[1]["content"]
        .as_str()
        .unwrap()
        .contains("permission denied"));

    // Embedding the distilled items through the HTTP embedder yields patterns.
    let (eurl, _) = mock_server(embeddings_handler()).await;
    let e = HttpEmbedder::new(HttpEmbedderConfig::new(eurl, "m", 3)).unwrap();
    let pats = embed_items(&e, &items).await.unwrap();
    assert_eq!(pats.len(), 2);
    assert_eq!(pats[0].embedding[0], items[0].embedding_text().len() as f32);
    assert_eq!(pats[0].source_task, Some(42));
}

#[tokio::test]
async fn llm_distiller_reports_failures() {
    let (url, _) = mock_server(Arc::new(|_: &Seen| (503, "busy".to_string()))).await;
    let d = LlmDistiller::new(LlmDistillerConfig::new(url, "m")).unwrap();
    let e = d.distill(&failed_task()).await.unwrap_err();
    assert_eq!(e.code(), "distill_failed");
    assert!(e.to_string().contains("503"));
    let handler: Handler = Arc::new(|_: &Seen| {
        (
            200,
            json!({"choices": [{"message": {"content": "I cannot help with that."}}]}).to_string(),
        )
    });
    let (url, _) = mock_server(handler).await;
    let d = LlmDistiller::new(LlmDistillerConfig::new(url, "m")).unwrap();
    assert_eq!(
        d.distill(&failed_task()).await.unwrap_err().code(),
        "distill_failed"
    );
    let (url, _) = mock_server(Arc::new(|_: &Seen| (200, "{}".to_string()))).await;
    let d = LlmDistiller::new(LlmDistillerConfig::new(url, "m")).unwrap();
    assert_eq!(
        d.distill(&failed_task()).await.unwrap_err().code(),
        "distill_failed"
    );
}
