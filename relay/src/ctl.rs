//! `relay ctl`: the operator's command line for the failback controller's API
//! ([`crate::api`]): human output by default, `--json` for scripts, `--wait` to follow
//! a job with a progress bar and its live ETA until it ends (exit status 0 only if it
//! succeeded).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use fbr_controller::{Operation, PointChoice, ReprotectLocation};
use fbr_enroll::heartbeat::HeartbeatClient;

use crate::api::{EstimatePost, JobPost, JobView};

/// How often `--wait` asks.
const POLL: Duration = Duration::from_millis(500);

/// Parses a point: `latest`, `latest-processed`, `latest-app-consistent`, or a tag id.
pub fn parse_point(s: &str) -> Result<PointChoice, String> {
    Ok(match s {
        "latest" => PointChoice::Latest,
        "latest-processed" | "latest_processed" => PointChoice::LatestProcessed,
        "latest-app-consistent" | "latest_app_consistent" => PointChoice::LatestAppConsistent,
        tag => PointChoice::Tag(tag.parse().map_err(|_| {
            format!(
                "point {tag:?}: latest, latest-processed, latest-app-consistent, or a tag id (see `master-target points`)"
            )
        })?),
    })
}

/// Parses a boot order: groups separated by `;`, VMs within a group by `,`.
pub fn parse_boot(s: &str) -> Result<Vec<Vec<String>>, String> {
    let groups: Vec<Vec<String>> = s
        .split(';')
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    if groups.iter().any(|g| g.is_empty()) {
        return Err(format!(
            "boot order {s:?}: groups of VMs separated by ';', VMs by ',' (e.g. \"db1,db2;app1\")"
        ));
    }
    Ok(groups)
}

/// What an operator asks for.
#[derive(Debug, Clone)]
pub enum CtlRequest {
    Vms,
    Points,
    Jobs {
        vm: Option<String>,
        state: Option<String>,
        operation: Option<String>,
        limit: Option<usize>,
    },
    Job(u64),
    Start(JobPost),
    Cancel(u64),
    Estimate(EstimatePost),
}

/// Builds the job request of an operation on `vms`.
pub fn job_post(
    operation: Operation,
    vms: Vec<String>,
    key: Option<String>,
    boot: Option<Vec<Vec<String>>>,
    boot_delay_s: u64,
) -> JobPost {
    JobPost {
        operation,
        vms,
        idempotency_key: key,
        boot,
        boot_delay_s,
    }
}

/// `reprotect --retention-window`: seconds, from `90m`, `72h` or `15d`.
pub fn parse_window(s: &str) -> Result<u64, String> {
    fbr_daemon::process::parse_window(s).map(|w| w.as_secs())
}

/// `reprotect`'s location flag.
pub fn location(alternate: bool) -> ReprotectLocation {
    if alternate {
        ReprotectLocation::Alternate
    } else {
        ReprotectLocation::Original
    }
}

/// Runs one request; prints its answer (JSON with `json`); with `wait`, follows the
/// job it names to its end. Ok(true) when the job (if any) succeeded.
pub async fn run(
    client: &HeartbeatClient,
    request: CtlRequest,
    json: bool,
    wait: bool,
) -> Result<bool, String> {
    let (method, path, body) = match &request {
        CtlRequest::Vms => ("GET", "/v1/vms".to_owned(), Vec::new()),
        CtlRequest::Points => ("GET", "/v1/points".to_owned(), Vec::new()),
        CtlRequest::Jobs {
            vm,
            state,
            operation,
            limit,
        } => {
            let mut q = Vec::new();
            if let Some(v) = vm {
                q.push(format!("vm={v}"));
            }
            if let Some(s) = state {
                q.push(format!("state={s}"));
            }
            if let Some(o) = operation {
                q.push(format!("operation={o}"));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let q = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            ("GET", format!("/v1/jobs{q}"), Vec::new())
        }
        CtlRequest::Job(id) => ("GET", format!("/v1/jobs/{id}"), Vec::new()),
        CtlRequest::Start(post) => (
            "POST",
            "/v1/jobs".to_owned(),
            serde_json::to_vec(post).map_err(|e| e.to_string())?,
        ),
        CtlRequest::Cancel(id) => ("POST", format!("/v1/jobs/{id}/cancel"), Vec::new()),
        CtlRequest::Estimate(post) => (
            "POST",
            "/v1/estimate".to_owned(),
            serde_json::to_vec(post).map_err(|e| e.to_string())?,
        ),
    };
    let answer = client.request(method, &path, body).await?;
    let doc: serde_json::Value =
        serde_json::from_slice(&answer).map_err(|e| format!("the relay's answer: {e}"))?;
    let job: Option<JobView> = doc
        .get("job")
        .filter(|j| !j.is_null())
        .and_then(|j| serde_json::from_value(j.clone()).ok());
    if wait {
        if let Some(job) = job {
            return follow(client, job.job.id, json).await;
        }
    }
    if json {
        println!("{doc}");
    } else {
        print_human(&request, &doc, job.as_ref());
    }
    Ok(job.is_none_or(|j| {
        !matches!(
            j.job.state,
            fbr_controller::JobState::Failed | fbr_controller::JobState::Cancelled
        )
    }))
}

/// Follows job `id` until it ends: a progress bar on a terminal (a line per change
/// otherwise), then the job.
async fn follow(client: &HeartbeatClient, id: u64, json: bool) -> Result<bool, String> {
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    loop {
        let answer = client
            .request("GET", &format!("/v1/jobs/{id}"), Vec::new())
            .await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| format!("the relay's answer: {e}"))?;
        let view: JobView = serde_json::from_value(doc["job"].clone())
            .map_err(|e| format!("the relay's job: {e}"))?;
        let line = progress_line(&view);
        if line != last_line {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last_line = line;
        }
        if view.job.state.is_finished() {
            if tty {
                eprintln!();
            }
            if json {
                println!("{doc}");
            } else {
                print_job(&view);
            }
            return Ok(view.job.state == fbr_controller::JobState::Succeeded);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `[#########-----------] 45% roll_back  ETA 12 s`.
pub fn progress_line(v: &JobView) -> String {
    const WIDTH: usize = 30;
    let filled = ((v.percent / 100.0) * WIDTH as f64).round() as usize;
    let bar: String = "#".repeat(filled.min(WIDTH)) + &"-".repeat(WIDTH - filled.min(WIDTH));
    let step = v
        .job
        .current_step()
        .map(|i| v.job.steps[i].kind.name())
        .unwrap_or("done");
    let eta = match v.eta_s {
        Some(s) if !v.job.state.is_finished() => format!("  ETA {}", seconds(s)),
        _ => String::new(),
    };
    format!(
        "job {} {} [{bar}] {:3.0}% {step}{eta}",
        v.job.id,
        v.job.operation.name(),
        v.percent
    )
}

fn seconds(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn print_job(v: &JobView) {
    let j = &v.job;
    let state = serde_json::to_value(j.state)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_default();
    let timing = match (v.actual_s, j.estimate_s) {
        (Some(a), Some(e)) => format!(" in {a:.1} s (estimated {e:.1} s)"),
        (Some(a), None) => format!(" in {a:.1} s"),
        (None, _) => format!(", {:.0}% done", v.percent),
    };
    println!(
        "job {} {} on {}: {state}{timing}",
        j.id,
        j.operation.name(),
        j.vms.join(", ")
    );
    for (i, s) in j.steps.iter().enumerate() {
        let took = match (s.started_ms, s.ended_ms) {
            (Some(a), Some(b)) => format!("{:.1} s", b.saturating_sub(a) as f64 / 1000.0),
            _ => String::new(),
        };
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "  {:>2} {:<24} {:<8} {:>8}  {}",
            i + 1,
            s.kind.name(),
            state,
            took,
            s.note.as_deref().unwrap_or("")
        );
    }
    if let Some(e) = &j.error {
        println!("  error {}: {}", e.code.name(), e.message);
        println!("  remedy: {}", e.remedy);
    }
}

fn print_human(request: &CtlRequest, doc: &serde_json::Value, job: Option<&JobView>) {
    match request {
        CtlRequest::Vms => {
            println!("{:<24} {:<18} {:>5}  last error", "VM", "STATE", "JOB");
            for vm in doc["vms"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<18} {:>5}  {}",
                    vm["vm"].as_str().unwrap_or(""),
                    vm["protection"].as_str().unwrap_or(""),
                    vm["job"]
                        .as_u64()
                        .map(|j| j.to_string())
                        .unwrap_or_default(),
                    vm["last_error"]["message"].as_str().unwrap_or("")
                );
            }
        }
        CtlRequest::Points => {
            println!(
                "{:<24} {:<16} {:>8} {:<6} time",
                "VM", "GROUP", "TAG", "KIND"
            );
            for vm in doc["points"]["vms"].as_array().into_iter().flatten() {
                for p in vm["points"].as_array().into_iter().flatten() {
                    let time = p["time_ms"]
                        .as_u64()
                        .map(|t| format!("{t} ms since the epoch"))
                        .unwrap_or_default();
                    println!(
                        "{:<24} {:<16} {:>8} {:<6} {time}",
                        vm["vm"].as_str().unwrap_or(""),
                        p["group"].as_str().unwrap_or(""),
                        p["tag_id"],
                        p["kind"].as_str().unwrap_or("")
                    );
                }
            }
        }
        CtlRequest::Jobs { .. } => {
            for j in doc["jobs"].as_array().into_iter().flatten() {
                if let Ok(v) = serde_json::from_value::<JobView>(j.clone()) {
                    println!("{}", progress_line(&v));
                }
            }
        }
        CtlRequest::Cancel(_) => {
            println!("{}", doc["said"].as_str().unwrap_or(""));
        }
        CtlRequest::Estimate(_) => {
            let e = &doc["estimate"];
            let secs = |k: &str| {
                e[k].as_f64()
                    .map_or("unknown (not measured yet)".into(), seconds)
            };
            println!("failover estimate for {}:", e["vms"]);
            println!("  drain    {}", secs("drain_s"));
            println!("  copy     {}", secs("rollback_s"));
            println!("  boot     {}", secs("boot_s"));
            println!("  total    {}", secs("total_s"));
            println!("data-loss window per point kind:");
            println!("  latest (planned)    {}", secs("loss_latest_planned_s"));
            println!("  latest (unplanned)  {}", secs("loss_latest_unplanned_s"));
            println!("  latest processed    {}", secs("loss_latest_processed_s"));
            println!("  latest app-consistent {}", secs("loss_app_consistent_s"));
        }
        CtlRequest::Job(_) | CtlRequest::Start(_) => {
            if let Some(v) = job {
                print_job(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_boot_orders_parse() {
        assert_eq!(parse_point("latest"), Ok(PointChoice::Latest));
        assert_eq!(
            parse_point("latest-app-consistent"),
            Ok(PointChoice::LatestAppConsistent)
        );
        assert_eq!(parse_point("17"), Ok(PointChoice::Tag(17)));
        assert!(parse_point("yesterday").is_err());
        assert_eq!(
            parse_boot("db1, db2;app1"),
            Ok(vec![vec!["db1".into(), "db2".into()], vec!["app1".into()]])
        );
        assert!(parse_boot("db1;;app1").is_err());
    }
}
