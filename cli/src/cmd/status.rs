//! `swarm status`: a readable summary of a cluster, its workers and its queue; the
//! cluster and swarm renderings are shared with `swarm cluster` and `swarm swarms`.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use swarm_proto::api::{ClusterView, StatusView, SwarmView};

use crate::args::StatusArgs;
use crate::client::Client;
use crate::sse::SseParser;

/// Print the status once, or with `--watch` redraw it as the cluster changes until
/// Ctrl-C.
pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    let Some(min_secs) = a.watch else {
        let s = client.status().await?;
        println!("{}", show(&s, a.json)?);
        return Ok(ExitCode::SUCCESS);
    };
    tokio::select! {
        r = watch(&client, a.json, Duration::from_secs(min_secs)) => r,
        _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
    }
}

fn show(s: &StatusView, json: bool) -> anyhow::Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(s)?
    } else {
        render(s)
    })
}

/// Redraw on every `status` event of the cluster's stream (no more often than `min`),
/// resuming the stream when it breaks; the first view comes from `GET /v1/status`.
async fn watch(client: &Client, json: bool, min: Duration) -> anyhow::Result<ExitCode> {
    use futures::StreamExt as _;
    let draw = |s: &StatusView| -> anyhow::Result<()> {
        // Clear the screen and home the cursor, then redraw.
        print!("\x1b[2J\x1b[H{}", show(s, json)?);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        Ok(())
    };
    draw(&client.status().await?)?;
    let mut drawn = tokio::time::Instant::now();
    let mut pending: Option<StatusView> = None;
    let mut last_id: Option<String> = None;
    loop {
        let resp = match client.cluster_events(last_id.as_deref()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("\nevent stream: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        loop {
            let wait = drawn + min;
            let piece = tokio::select! {
                p = body.next() => p,
                _ = tokio::time::sleep_until(wait), if pending.is_some() => {
                    if let Some(s) = pending.take() {
                        draw(&s)?;
                        drawn = tokio::time::Instant::now();
                    }
                    continue;
                }
            };
            let Some(Ok(piece)) = piece else { break };
            for ev in parser.push(&piece) {
                if ev.id.is_some() {
                    last_id = ev.id.clone();
                }
                if ev.event == "status" {
                    pending = Some(serde_json::from_str(&ev.data)?);
                }
            }
            if pending.is_some() && drawn.elapsed() >= min {
                if let Some(s) = pending.take() {
                    draw(&s)?;
                    drawn = tokio::time::Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Render a status as aligned plain text (no colour codes, so it pipes cleanly).
pub fn render(s: &StatusView) -> String {
    let mut out = render_cluster(&s.cluster);
    let slots: u64 = s.workers.iter().map(|w| w.slots as u64).sum();
    let busy: u64 = s.workers.iter().map(|w| w.running as u64).sum();
    let draining = s.workers.iter().filter(|w| w.draining).count();
    let _ = writeln!(
        out,
        "workers     {} connected{}, {busy} of {slots} slots busy",
        s.workers.len(),
        if draining > 0 {
            format!(" ({draining} draining)")
        } else {
            String::new()
        }
    );
    if !s.workers.is_empty() {
        let mut rows = vec![vec![
            "WORKER".into(),
            "SLOTS".into(),
            "RUNNING".into(),
            "LOAD".into(),
            "0-RTT".into(),
            "LABELS".into(),
            "ADDRESS".into(),
        ]];
        let relayed = s.workers.iter().filter(|w| w.via.is_some()).count();
        for w in &s.workers {
            let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push(vec![
                worker_label(w),
                w.slots.to_string(),
                w.running.to_string(),
                load_bar(w.running, w.slots),
                if w.zero_rtt { "yes" } else { "no" }.into(),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
                match &w.via {
                    Some(lead) => format!("via {lead}"),
                    None => w.addr.clone(),
                },
            ]);
        }
        table(&mut out, &rows);
        if relayed > 0 {
            let _ = writeln!(
                out,
                "            {} worker connections ({relayed} workers relayed by their leads)",
                s.workers.len() - relayed
            );
        }
    }
    let q = &s.queue;
    // Waiting (graph) tasks only when there are any: most clusters run none.
    let mut waiting = if q.waiting > 0 {
        format!("waiting {}  ", q.waiting)
    } else {
        String::new()
    };
    // Likewise tasks awaiting an operator's approval.
    if q.awaiting_approval > 0 {
        waiting.push_str(&format!("awaiting approval {}  ", q.awaiting_approval));
    }
    let _ = writeln!(
        out,
        "queue       {waiting}queued {}  running {}  succeeded {}  failed {}  cancelled {}  dead-lettered {}  (limit {})",
        q.queued, q.running, q.succeeded, q.failed, q.cancelled, q.dead_lettered, s.queue_limit
    );
    let _ = writeln!(
        out,
        "throughput  {:.1} tasks/s ({} finished in the last minute)",
        s.throughput.per_second, s.throughput.finished_last_minute
    );
    if let Some(l) = &s.latency {
        let _ = writeln!(
            out,
            "latency     p50 {} ms  p90 {} ms  p99 {} ms  (submit to final, last minute)",
            l.p50_ms, l.p90_ms, l.p99_ms
        );
    }
    if !s.usage.is_empty() {
        out.push_str(&render_usage(&s.usage));
    }
    for sw in &s.swarms {
        out.push('\n');
        out.push_str(&render_swarm(sw));
    }
    out
}

/// Token usage and budgets, one line per swarm and one per agent and model.
pub fn render_usage(swarms: &[swarm_proto::api::SwarmUsageView]) -> String {
    let mut out = String::new();
    for s in swarms {
        let budget = match s.budget {
            Some(b) if s.exhausted => format!(" of {b} (budget spent: its llm agents wait)"),
            Some(b) => format!(" of {b}"),
            None => String::new(),
        };
        let _ = writeln!(out, "tokens      {}: {}{budget}", s.swarm, s.tokens);
        for a in &s.agents {
            let _ = writeln!(
                out,
                "              {} {}: {} prompt + {} completion in {} attempts",
                a.agent, a.model, a.prompt_tokens, a.completion_tokens, a.attempts
            );
        }
    }
    out
}

/// One line per swarm.
pub fn render_swarm_list(swarms: &[SwarmView]) -> String {
    let mut rows = vec![vec![
        "SWARM".into(),
        "TOPOLOGY".into(),
        "MEMBERS".into(),
        "QUEUED".into(),
        "RUNNING".into(),
        "LABELS".into(),
        "NOTE".into(),
    ]];
    for s in swarms {
        rows.push(vec![
            s.name.clone(),
            describe_topology(s),
            s.layout
                .as_ref()
                .map_or("-".to_string(), |l| l.workers.len().to_string()),
            s.tasks.queued.to_string(),
            s.tasks.running.to_string(),
            selector(s),
            s.problem.clone().unwrap_or_default(),
        ]);
    }
    let mut out = String::new();
    table(&mut out, &rows);
    out
}

/// A swarm's header line and its topology drawing.
pub fn render_swarm(s: &SwarmView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "swarm {}   {}   labels {}   queue depth {}   queued {}  running {}",
        s.name,
        describe_topology(s),
        selector(s),
        s.queue_depth,
        s.tasks.queued,
        s.tasks.running
    );
    match (&s.layout, &s.problem) {
        (Some(l), _) => {
            for line in l.render_text().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        (None, Some(p)) => {
            let _ = writeln!(out, "  no layout: {p}");
        }
        (None, None) => {
            let _ = writeln!(out, "  no layout (ask the leader)");
        }
    }
    out
}

fn describe_topology(s: &SwarmView) -> String {
    match (s.topology.as_str(), s.fan_out, s.max_degree) {
        ("hierarchical", Some(f), _) => format!("hierarchical (fan-out {f})"),
        ("mesh", _, Some(d)) => format!("mesh (degree ≤ {d})"),
        ("ring", _, _) => format!("ring ({})", s.stages.join(" → ")),
        (t, _, _) => t.to_string(),
    }
}

fn selector(s: &SwarmView) -> String {
    if s.labels.is_empty() {
        "*".to_string()
    } else {
        s.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The coordinator cluster: one line for the answering node, one row per member.
pub fn render_cluster(c: &ClusterView) -> String {
    let mut out = String::new();
    let leader = c.leader.map_or("none".to_string(), |l| l.to_string());
    let _ = writeln!(
        out,
        "cluster     node {} is {}, term {}, leader {leader}, committed {}, applied {} of log {}",
        c.node_id,
        c.role,
        c.term,
        opt(c.committed_index),
        opt(c.applied_index),
        opt(c.last_log_index),
    );
    let mut rows = vec![vec![
        "NODE".into(),
        "ROLE".into(),
        "VOTER".into(),
        "TERM".into(),
        "APPLIED".into(),
        "LOG".into(),
        "MATCHED".into(),
        "LAG".into(),
        "RAFT".into(),
        "API".into(),
        "HEALTH".into(),
    ]];
    for n in &c.nodes {
        let (role, term, applied, log, health) = match (&n.status, &n.error) {
            (Some(st), _) => (
                st.role.clone(),
                st.term.to_string(),
                opt(st.applied_index),
                opt(st.last_log_index),
                match (st.healthy, st.ready) {
                    (true, true) => "ok".to_string(),
                    (true, false) => "not ready".to_string(),
                    (false, _) => format!("UNHEALTHY: {}", st.health),
                },
            ),
            (None, Some(e)) => (
                n.role.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("DOWN: {e}"),
            ),
            (None, None) => (
                n.role.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        rows.push(vec![
            n.id.to_string(),
            role,
            if n.voter { "yes" } else { "no" }.into(),
            term,
            applied,
            log,
            opt(n.matched_index),
            opt(n.lag),
            n.raft_addr.clone(),
            n.api_addr.clone(),
            health,
        ]);
    }
    table(&mut out, &rows);
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |i| i.to_string())
}

fn load_bar(running: u32, slots: u32) -> String {
    const WIDTH: u32 = 10;
    let filled = if slots == 0 {
        0
    } else {
        (running.min(slots) * WIDTH).div_ceil(slots)
    };
    let pct = (running * 100).checked_div(slots).unwrap_or(0);
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

pub(crate) fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from("  ");
        for (i, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// A worker's id, marked when it is draining: it gets no new work, and leaves once its
/// attempts end (being stopped) or stays until resumed (drained by an operator).
fn worker_label(w: &swarm_proto::api::WorkerView) -> String {
    match (w.draining, w.drain) {
        (false, _) => w.id.clone(),
        (true, Some(swarm_proto::api::DrainKind::Operator)) => {
            format!("{} (drained by operator)", w.id)
        }
        (true, _) => format!("{} (draining)", w.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_proto::api::*;

    #[test]
    fn renders_every_section() {
        let s = StatusView {
            cluster: ClusterView {
                node_id: 1,
                role: "leader".into(),
                term: 2,
                leader: Some(1),
                last_log_index: Some(10),
                committed_index: Some(10),
                applied_index: Some(10),
                nodes: vec![NodeView {
                    id: 1,
                    raft_addr: "127.0.0.1:7070".into(),
                    api_addr: "127.0.0.1:8080".into(),
                    role: "leader".into(),
                    voter: true,
                    matched_index: Some(10),
                    lag: Some(0),
                    status: None,
                    error: Some("unreachable: connection refused".into()),
                }],
            },
            workers: vec![
                WorkerView {
                    id: "w1".into(),
                    addr: "127.0.0.1:5000".into(),
                    slots: 4,
                    running: 2,
                    labels: [("gpu".to_string(), "yes".to_string())].into(),
                    agents: vec!["echo".into()],
                    connected_at_ms: 0,
                    last_heartbeat_ms: 0,
                    zero_rtt: true,
                    via: None,
                    draining: false,
                    drain: None,
                },
                WorkerView {
                    id: "w2".into(),
                    addr: "127.0.0.1:5001".into(),
                    slots: 2,
                    running: 1,
                    labels: Default::default(),
                    agents: vec!["echo".into()],
                    connected_at_ms: 0,
                    last_heartbeat_ms: 0,
                    zero_rtt: false,
                    via: None,
                    draining: true,
                    drain: Some(DrainKind::Stopping),
                },
            ],
            queue: QueueCounts {
                queued: 3,
                succeeded: 7,
                ..Default::default()
            },
            queue_limit: 100,
            swarms: Vec::new(),
            usage: vec![swarm_proto::api::SwarmUsageView {
                swarm: "writers".into(),
                tokens: 120,
                budget: Some(100),
                exhausted: true,
                agents: vec![swarm_proto::api::AgentUsageView {
                    agent: "writer".into(),
                    model: "m1".into(),
                    prompt_tokens: 100,
                    completion_tokens: 20,
                    attempts: 3,
                }],
            }],
            throughput: Throughput {
                finished_last_minute: 60,
                per_second: 1.0,
            },
            latency: Some(LatencyView {
                tasks: 60,
                p50_ms: 12,
                p90_ms: 40,
                p99_ms: 101,
            }),
        };
        let text = render(&s);
        assert!(text.contains("p50 12 ms  p90 40 ms  p99 101 ms"), "{text}");
        assert!(text.contains("node 1 is leader, term 2"), "{text}");
        assert!(text.contains("DOWN: unreachable"), "{text}");
        assert!(
            text.contains("2 connected (1 draining), 3 of 6 slots busy"),
            "{text}"
        );
        assert!(text.contains("[#####.....]  50%"), "{text}");
        assert!(text.contains("w2 (draining)"), "{text}");
        let mut drained = s.workers[1].clone();
        drained.drain = Some(DrainKind::Operator);
        assert_eq!(worker_label(&drained), "w2 (drained by operator)");
        assert!(!text.contains("w1 (draining)"), "{text}");
        assert!(text.contains("gpu=yes"), "{text}");
        assert!(text.contains("queued 3"), "{text}");
        assert!(!text.contains("awaiting approval"), "{text}");
        let mut awaiting = s.clone();
        awaiting.queue.awaiting_approval = 2;
        assert!(
            render(&awaiting).contains("awaiting approval 2  queued 3"),
            "{}",
            render(&awaiting)
        );
        assert!(text.contains("1.0 tasks/s"), "{text}");
        assert!(text.contains("writers: 120 of 100 (budget spent"), "{text}");
        assert!(
            text.contains("writer m1: 100 prompt + 20 completion in 3 attempts"),
            "{text}"
        );
    }
}
