//! A WAN impairment proxy on loopback, for kernels without `sch_netem` (where
//! [`crate::netem::WanLink`] cannot shape a link): a UDP relay between one client (the
//! relay) and one server (the master target) that imposes, per direction, what netem
//! would: half the round trip as delay, random loss, a rate limit with a bounded queue
//! (drop-tail at two bandwidth-delay products), a path MTU (larger datagrams are
//! dropped, as a router would without fragmenting), and an outage switch (everything
//! dropped).
//!
//! Each direction is one task: a datagram's departure is when the previous one finished
//! serializing at the link rate, its arrival that plus the one-way delay; datagrams are
//! delivered in order at their arrival time. It costs CPU the emulated link would not,
//! so rates far above 100 Mbit/s measure the proxy as much as the path.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::netem::LinkShape;

/// IPv4 and UDP headers: what the MTU counts beyond the datagram.
const IP_UDP_HEADERS: usize = 28;

/// The proxy: its address for the client, and its switches.
#[derive(Debug)]
pub struct ImpairedLink {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bytes delivered to the server, IPv4 and UDP headers included (what the link
    /// rate counts).
    delivered_to_server: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ImpairedLink {
    /// Starts a proxy on 127.0.0.1 forwarding to `server` (on loopback).
    pub async fn start(server: SocketAddr, shape: LinkShape) -> std::io::Result<ImpairedLink> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(server).await?;
        let addr = front.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (to_server_tx, to_server_rx) = tokio::sync::mpsc::unbounded_channel();
        let (to_client_tx, to_client_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        // Client -> server.
        {
            let (front, client) = (front.clone(), client.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    // An error here is an ICMP report about an earlier datagram (a
                    // client gone); the socket itself is fine.
                    let Ok((n, from)) = front.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                    if to_server_tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }));
        }
        // Server -> client.
        {
            let back = back.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    // The socket is connected to the server, so a server that died (and
                    // will restart on the same port) shows up as ECONNREFUSED here:
                    // keep listening for it.
                    let Ok(n) = back.recv(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    if to_client_tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }));
        }
        let delivered_to_server = Arc::new(AtomicU64::new(0));
        let (d1, b1, c1) = (down.clone(), back.clone(), delivered_to_server.clone());
        tasks.push(tokio::spawn(direction(to_server_rx, shape, d1, move |p| {
            let (b, c) = (b1.clone(), c1.clone());
            async move {
                c.fetch_add((p.len() + IP_UDP_HEADERS) as u64, Ordering::Relaxed);
                let _ = b.send(&p).await;
            }
        })));
        let d2 = down.clone();
        tasks.push(tokio::spawn(direction(to_client_rx, shape, d2, move |p| {
            let (f, c) = (front.clone(), client.clone());
            async move {
                let to = *c.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(to) = to {
                    let _ = f.send_to(&p, to).await;
                }
            }
        })));
        Ok(ImpairedLink {
            addr,
            down,
            delivered_to_server,
            tasks,
        })
    }

    /// Drops everything both ways (`true`), or restores the shape (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Bytes delivered to the server so far, headers included.
    pub fn delivered_to_server(&self) -> u64 {
        self.delivered_to_server.load(Ordering::Relaxed)
    }
}

impl Drop for ImpairedLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One direction: loss, MTU, queue and rate on arrival; delivery at the arrival time.
async fn direction<F, Fut>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    s: LinkShape,
    down: Arc<AtomicBool>,
    deliver: F,
) where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut in_flight: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    // When the link finishes serializing what it has accepted.
    let mut link_free_at = Instant::now();
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        let next_due = in_flight.front().map(|(at, _)| *at);
        tokio::select! {
            packet = rx.recv() => {
                let Some(packet) = packet else { return };
                if down.load(Ordering::SeqCst) {
                    continue;
                }
                if s.mtu.is_some_and(|m| packet.len() + IP_UDP_HEADERS > m as usize) {
                    continue;
                }
                // xorshift64*: loss decisions need no cryptographic randomness.
                rng_state ^= rng_state >> 12;
                rng_state ^= rng_state << 25;
                rng_state ^= rng_state >> 27;
                let draw = (rng_state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                if draw * 100.0 < s.loss_percent {
                    continue;
                }
                let now = Instant::now();
                let one_way = s.rtt / 2;
                let arrival = match s.rate_mbit {
                    Some(mbit) => {
                        let bits = ((packet.len() + IP_UDP_HEADERS) * 8) as f64;
                        let serialize = Duration::from_secs_f64(bits / (mbit as f64 * 1e6));
                        // Drop-tail: the queue holds two bandwidth-delay products (as
                        // time waiting to be serialized: two round trips, 10 ms at least).
                        let queue = link_free_at.saturating_duration_since(now);
                        if queue > (s.rtt * 2).max(Duration::from_millis(10)) {
                            continue;
                        }
                        link_free_at = link_free_at.max(now) + serialize;
                        link_free_at + one_way
                    }
                    None => now + one_way,
                };
                in_flight.push_back((arrival, packet));
            }
            _ = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while in_flight.front().is_some_and(|(at, _)| *at <= now) {
                    let (_, p) = in_flight.pop_front().expect("checked");
                    if !down.load(Ordering::SeqCst) {
                        deliver(p).await;
                    }
                }
            }
        }
    }
}
