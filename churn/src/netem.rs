//! WAN emulation: the master target in a network namespace of its own, reached from the
//! relay through a veth pair whose two ends are shaped by `tc netem` (delay, loss,
//! rate), with a path MTU of choice, and a switch that drops the link (100% loss) and
//! brings it back.
//!
//! ```text
//!  root namespace                      namespace fbr<hex>
//!  relay ── fbr<hex>h 10.x.y.(4k+1) ═══ fbr<hex>n 10.x.y.(4k+2) ── master target
//!           netem: RTT/2, loss, rate      netem: RTT/2, loss, rate
//! ```
//!
//! Only addresses inside the /30 the link creates are used; the namespace and the veth
//! pair are deleted when the [`WanLink`] is dropped. Needs root (CAP_NET_ADMIN), the
//! `ip` and `tc` tools and the kernel's `sch_netem`; where [`WanLink::create`] fails,
//! [`crate::wanemu`] says why and uses [`crate::impair`]'s proxy instead.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// How the emulated WAN behaves (each direction gets half the round trip).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    pub rtt: Duration,
    /// Random loss per packet and direction, percent.
    pub loss_percent: f64,
    /// Link rate per direction (`None`: unlimited).
    pub rate_mbit: Option<u64>,
    /// The veth pair's MTU: the path MTU (`None`: 1500).
    pub mtu: Option<u32>,
}

impl LinkShape {
    /// A clean link: no delay, no loss.
    pub const CLEAN: LinkShape = LinkShape {
        rtt: Duration::ZERO,
        loss_percent: 0.0,
        rate_mbit: None,
        mtu: None,
    };

    /// `tc qdisc replace ... netem` arguments for one direction.
    fn netem_args(&self, down: bool) -> Vec<String> {
        let mut a = vec!["netem".to_string()];
        let half_ms = self.rtt.as_secs_f64() * 1000.0 / 2.0;
        if half_ms > 0.0 {
            a.extend(["delay".into(), format!("{half_ms:.3}ms")]);
        }
        let loss = if down { 100.0 } else { self.loss_percent };
        if loss > 0.0 {
            a.extend(["loss".into(), format!("{loss}%")]);
        }
        if let Some(r) = self.rate_mbit {
            a.extend(["rate".into(), format!("{r}mbit")]);
        }
        // Room for two bandwidth-delay products of 1,400-byte packets (netem's default
        // queue of 1,000 packets would drop at 1 Gbit/s and 80 ms on its own).
        let rate_bps = self.rate_mbit.unwrap_or(10_000) as f64 * 1e6 / 8.0;
        let bdp_packets = rate_bps * self.rtt.as_secs_f64().max(0.001) / 1400.0;
        a.extend([
            "limit".into(),
            format!("{}", (2.0 * bdp_packets).max(1000.0) as u64),
        ]);
        a
    }
}

/// A namespace holding one end of a shaped veth pair; deleted on drop.
#[derive(Debug)]
pub struct WanLink {
    ns: String,
    host_if: String,
    ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    shape: LinkShape,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

impl WanLink {
    /// Creates the namespace and the veth pair, addressed and shaped.
    pub fn create(shape: LinkShape) -> anyhow::Result<WanLink> {
        // Unique per link: RandomState's keys are random per process and per call.
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as u32;
        let tag = format!("{r:08x}");
        let (second, third, fourth) = (
            200 + (r % 50) as u8,
            (r >> 8) as u8,
            ((r >> 16) as u8 & 63) * 4,
        );
        let link = WanLink {
            ns: format!("fbr{tag}"),
            host_if: format!("fbr{tag}h"),
            ns_if: format!("fbr{tag}n"),
            host_ip: Ipv4Addr::new(10, second, third, fourth + 1),
            ns_ip: Ipv4Addr::new(10, second, third, fourth + 2),
            shape,
        };
        ip(&["netns", "add", &link.ns])?;
        // From here on, Drop cleans up whatever was made.
        let (ns, h, n) = (&link.ns, &link.host_if, &link.ns_if);
        ip(&["link", "add", h, "type", "veth", "peer", "name", n])?;
        ip(&["link", "set", n, "netns", ns])?;
        let mtu = shape.mtu.unwrap_or(1500).to_string();
        ip(&["addr", "add", &format!("{}/30", link.host_ip), "dev", h])?;
        ip(&["link", "set", h, "mtu", &mtu, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", link.ns_ip),
            "dev",
            n,
        ])?;
        ip(&["-n", ns, "link", "set", n, "mtu", &mtu, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        link.apply(shape, false)?;
        Ok(link)
    }

    fn apply(&self, shape: LinkShape, down: bool) -> anyhow::Result<()> {
        let args = shape.netem_args(down);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut host = vec!["qdisc", "replace", "dev", &self.host_if, "root"];
        host.extend(&args);
        run(Command::new("tc").args(&host))?;
        let mut inner = vec![
            "-n",
            &self.ns,
            "qdisc",
            "replace",
            "dev",
            &self.ns_if,
            "root",
        ];
        inner.extend(&args);
        run(Command::new("tc").args(&inner))
    }

    /// Drops every packet both ways (`true`), or restores the shape (`false`).
    pub fn set_down(&self, down: bool) -> anyhow::Result<()> {
        self.apply(self.shape, down)
    }

    /// Bytes the link delivered towards the namespace (the master target), Ethernet,
    /// IP and UDP headers included: the host end's transmitted bytes, counted after
    /// netem dropped what it drops.
    pub fn delivered_to_namespace(&self) -> Option<u64> {
        std::fs::read_to_string(format!(
            "/sys/class/net/{}/statistics/tx_bytes",
            self.host_if
        ))
        .ok()?
        .trim()
        .parse()
        .ok()
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: same process).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_arguments_split_the_round_trip_and_size_the_queue() {
        let s = LinkShape {
            rtt: Duration::from_millis(80),
            loss_percent: 1.0,
            rate_mbit: Some(1000),
            mtu: Some(1380),
        };
        assert_eq!(
            s.netem_args(false),
            ["netem", "delay", "40.000ms", "loss", "1%", "rate", "1000mbit", "limit", "14285"]
        );
        assert_eq!(s.netem_args(true)[4], "100%");
        assert_eq!(
            LinkShape::CLEAN.netem_args(false),
            ["netem", "limit", "1785"]
        );
    }
}
