//! `swarm schedules`: create, list, show, pause, resume and delete schedules.

use std::process::ExitCode;

use swarm_proto::api::{CreateSchedule, ScheduleView, SubmitTask};

use super::{ms, parse_labels};
use crate::args::SchedulesCmd;

pub async fn run(c: SchedulesCmd) -> anyhow::Result<ExitCode> {
    match c {
        SchedulesCmd::Create(a) => {
            let crate::args::ScheduleCreateArgs {
                api,
                name,
                agent,
                payload,
                every,
                cron,
                catch_up,
                max_catch_up,
                priority,
                timeout,
                max_attempts,
                labels,
                swarm,
                retain,
                paused,
                json,
            } = *a;
            let task = SubmitTask {
                agent,
                payload: payload
                    .map(|p| serde_json::from_str(&p).unwrap_or(serde_json::Value::String(p))),
                priority,
                timeout_ms: timeout.map(ms),
                max_attempts,
                labels: parse_labels(&labels)?,
                swarm,
                retain_ms: retain.map(ms),
                ..Default::default()
            };
            let req = CreateSchedule {
                name,
                every: every.map(|d| format!("{}ms", d.as_millis())),
                cron,
                catch_up: Some(catch_up),
                max_catch_up,
                paused,
                task,
            };
            let v = api.client()?.create_schedule(&req).await?;
            show(&v, json)?;
        }
        SchedulesCmd::List { api, json } => {
            let l = api.client()?.schedules().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", render_list(&l.schedules));
            }
        }
        SchedulesCmd::Get { api, name, json } => {
            let v = api.client()?.schedule(&name).await?;
            show(&v, json)?;
        }
        SchedulesCmd::Delete { api, name } => {
            api.client()?.delete_schedule(&name).await?;
            println!("deleted schedule {name}");
        }
        SchedulesCmd::Pause { api, name, json } => {
            let v = api.client()?.pause_schedule(&name, true).await?;
            show(&v, json)?;
        }
        SchedulesCmd::Resume { api, name, json } => {
            let v = api.client()?.pause_schedule(&name, false).await?;
            show(&v, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(v: &ScheduleView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", render(v));
    }
    Ok(())
}

/// `every 2s`, or the cron expression.
fn cadence(v: &ScheduleView) -> String {
    match (&v.cron, v.every_ms) {
        (Some(c), _) => format!("cron {c}"),
        (None, Some(ms)) if ms % 1000 == 0 => format!("every {}s", ms / 1000),
        (None, Some(ms)) => format!("every {ms}ms"),
        (None, None) => "-".into(),
    }
}

fn catch_up(v: &ScheduleView) -> String {
    match v.max_catch_up {
        Some(max) => format!("{} (max {max})", v.catch_up),
        None => v.catch_up.clone(),
    }
}

fn next(v: &ScheduleView) -> String {
    match (v.paused, v.next_tick_ms) {
        (true, _) => "paused".into(),
        (false, Some(t)) => super::tokens::when(t),
        (false, None) => "never".into(),
    }
}

/// One schedule, a field per line.
pub fn render(v: &ScheduleView) -> String {
    let mut out = format!(
        "schedule {}: {}, catch-up {}\n  task: agent {} in swarm {}, priority {}\n  next tick: {}\n  ticks: {} fired, {} skipped, {} refused\n",
        v.name,
        cadence(v),
        catch_up(v),
        v.agent,
        v.swarm,
        v.priority,
        next(v),
        v.fired,
        v.skipped,
        v.refused,
    );
    if let (Some(tick), Some(task)) = (v.last_tick_ms, v.last_task) {
        out.push_str(&format!(
            "  last: tick {} → task {task}\n",
            super::tokens::when(tick)
        ));
    }
    if let Some(e) = &v.last_error {
        out.push_str(&format!("  last refusal: {e}\n"));
    }
    out
}

/// Every schedule, a row each.
pub fn render_list(list: &[ScheduleView]) -> String {
    let mut rows = vec![vec![
        "SCHEDULE".to_string(),
        "CADENCE".into(),
        "AGENT".into(),
        "NEXT".into(),
        "FIRED".into(),
        "SKIPPED".into(),
        "REFUSED".into(),
        "LAST TASK".into(),
    ]];
    for v in list {
        rows.push(vec![
            v.name.clone(),
            cadence(v),
            v.agent.clone(),
            next(v),
            v.fired.to_string(),
            v.skipped.to_string(),
            v.refused.to_string(),
            v.last_task.map_or("-".into(), |t| t.to_string()),
        ]);
    }
    let mut out = String::new();
    super::status::table(&mut out, &rows);
    out
}
