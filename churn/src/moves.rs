//! The agent emulator's side of moving VMs between relays: it asks its configuration
//! server for its assignment every `poll`, and moves each of its VMs whose placement
//! rose (an operator asked for a move), reporting the move's progress until it is done.
//!
//! The move itself is the agent's ([`crate::agent::Mover::move_vm`]): drain the old
//! relay, or move off a lost one with a resync; this module only follows the
//! configuration server and tells it how the move goes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbr_enroll::heartbeat::HeartbeatClient;
use fbr_enroll::wire::{MoveProgress, VmPlacement};
use tokio::sync::watch;

use crate::agent::{Mover, Route};

/// Reports are sent at most this often while a move goes on.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Follows the configuration server until aborted: every `poll`, the assignment; a VM
/// placed higher than it writes now is moved (draining the old relay for up to
/// `drain_timeout` when the server says it can be drained).
pub async fn follow_assignments(
    mover: Mover,
    client: HeartbeatClient,
    poll: Duration,
    drain_timeout: Duration,
) {
    let moving: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    loop {
        match client.assignment().await {
            Ok(assignment) => {
                for p in assignment.placements {
                    let busy = moving
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&p.vm);
                    if busy || mover.placement(&p.vm).is_none_or(|now| p.placement <= now) {
                        continue;
                    }
                    match start(&mover, &p, drain_timeout) {
                        Ok(progress) => {
                            moving
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(p.vm.clone());
                            tokio::spawn(report(
                                client.clone(),
                                p.clone(),
                                progress,
                                moving.clone(),
                            ));
                        }
                        Err(e) => tracing::error!(vm = %p.vm, "cannot move: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("assignment from the configuration server: {e}"),
        }
        tokio::time::sleep(poll).await;
    }
}

fn start(
    mover: &Mover,
    p: &VmPlacement,
    drain_timeout: Duration,
) -> Result<watch::Receiver<MoveProgress>, String> {
    let address = p
        .relay_address
        .as_deref()
        .ok_or_else(|| format!("relay {} advertises no address", p.relay))?;
    let relay = address
        .parse()
        .map_err(|e| format!("relay {} at {address:?}: {e}", p.relay))?;
    tracing::info!(vm = %p.vm, relay = %p.relay, %address, placement = p.placement, drain = p.drain, "moving");
    mover.move_vm(
        &p.vm,
        Route {
            relay,
            relay_name: p.relay.clone(),
            placement: p.placement,
        },
        p.drain,
        drain_timeout,
    )
}

/// Tells the configuration server how move `p.move_id` goes, until it is finished.
async fn report(
    client: HeartbeatClient,
    p: VmPlacement,
    mut progress: watch::Receiver<MoveProgress>,
    moving: Arc<Mutex<BTreeSet<String>>>,
) {
    loop {
        let now = progress.borrow_and_update().clone();
        let finished = now.phase.is_some_and(|ph| ph.is_finished());
        send(&client, &p, &now, finished).await;
        if finished {
            break;
        }
        tokio::time::sleep(REPORT_EVERY).await;
        if progress.changed().await.is_err() {
            // The move's task is gone: what it left last is the final word.
            let last = progress.borrow().clone();
            send(&client, &p, &last, true).await;
            break;
        }
    }
    moving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&p.vm);
}

/// Posts one report. A lost report is not fatal (the next one says where the move
/// stands), but the last one is retried for a while.
async fn send(client: &HeartbeatClient, p: &VmPlacement, now: &MoveProgress, last: bool) {
    let Some(id) = p.move_id else { return };
    let body = serde_json::to_vec(now).unwrap_or_default();
    let path = format!("/v1/moves/{id}/progress");
    for attempt in 1.. {
        match client.request("POST", &path, body.clone()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(vm = %p.vm, move_id = id, "reporting the move: {e}");
                if !last || attempt >= 20 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
