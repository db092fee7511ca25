//! `swarm workers`: list the connected workers, drain one remotely (it takes no new work,
//! finishes what it runs and stays connected), resume it.

use std::process::ExitCode;

use swarm_proto::api::{DrainKind, WorkerView};

use crate::args::WorkersCmd;

pub async fn run(c: WorkersCmd) -> anyhow::Result<ExitCode> {
    match c {
        WorkersCmd::List { api, json } => {
            let list = api.client()?.workers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.workers.is_empty() {
                println!("no workers connected");
            } else {
                println!(
                    "{:<24} {:>5} {:>7}  {:<20} ADDRESS",
                    "ID", "SLOTS", "RUNNING", "STATE"
                );
                for w in &list.workers {
                    println!(
                        "{:<24} {:>5} {:>7}  {:<20} {}",
                        w.id,
                        w.slots,
                        w.running,
                        state(w),
                        w.via
                            .as_ref()
                            .map_or(w.addr.clone(), |lead| format!("via {lead}"))
                    );
                }
            }
        }
        WorkersCmd::Drain { api, id, json } => {
            let view = api.client()?.drain_worker(&id, true).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else if view.drain == Some(DrainKind::Stopping) {
                println!(
                    "worker {} is being stopped already: it takes no new work",
                    view.id
                );
            } else {
                println!(
                    "worker {} drained: it takes no new work, finishes the {} attempt(s) it runs and stays connected (`swarm workers resume {}` to undo)",
                    view.id, view.running, view.id
                );
            }
        }
        WorkersCmd::Resume { api, id, json } => {
            let view = api.client()?.drain_worker(&id, false).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("worker {} resumed: it takes new work again", view.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ready`, `draining (stopping)` or `drained (operator)`.
fn state(w: &WorkerView) -> String {
    match (w.draining, w.drain) {
        (false, _) => "ready".into(),
        (true, Some(DrainKind::Operator)) => "drained (operator)".into(),
        (true, Some(kind)) => format!("draining ({})", kind.as_str()),
        (true, None) => "draining".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let mut w = WorkerView {
            id: "w1".into(),
            addr: "127.0.0.1:1".into(),
            slots: 1,
            running: 0,
            labels: Default::default(),
            agents: vec![],
            connected_at_ms: 0,
            last_heartbeat_ms: 0,
            zero_rtt: false,
            via: None,
            draining: false,
            drain: None,
        };
        assert_eq!(state(&w), "ready");
        w.draining = true;
        assert_eq!(state(&w), "draining");
        w.drain = Some(DrainKind::Stopping);
        assert_eq!(state(&w), "draining (stopping)");
        w.drain = Some(DrainKind::Operator);
        assert_eq!(state(&w), "drained (operator)");
    }
}
