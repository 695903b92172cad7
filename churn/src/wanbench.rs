//! `churn bench-wan`: what the WAN leg costs per content model, against the
//! snapshot-shipping alternative (rsync once per recovery point).
//!
//! For each content model (and a realistic `mixed` profile) it runs a real site on
//! loopback (release binaries, every WAN reduction on), churns for a while, waits until
//! the relay's backlog is drained, and reads the relay's own `/metrics`: bytes after
//! each stage (logical, coalesced, zero-elided, deduplicated, compressed) and on the
//! wire, relay CPU per logical byte. In the same run it times the primitives the relay
//! must run (SHA-256 per 4 KiB block, LZ4, AES-256-GCM as TLS does) on the same data,
//! verifies every recovery point byte for byte, and then rebuilds the source disks at
//! every recovery point to measure what `rsync --inplace --no-whole-file -z` sends to
//! keep a copy in step (run over a local "remote shell" so rsync really uses its delta
//! algorithm and compression; wire = bytes sent + received).

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use fbr_master_target::journal::{apply_record, MemoryImage};
use fbr_protocol::wan::block_hash;
use fbr_protocol::StreamId;
use serde::Serialize;

use crate::agent::{self, AgentOptions, DiskPlan};
use crate::harness::{http_get, process_cpu_seconds, sample, sample_sum, Site, SiteOptions};
use crate::source::{ChangeSource, Manifest, SourceSpec};
use crate::verify;
use crate::workload::{Content, ContentPools, Profile};

/// What to run.
#[derive(Debug, Clone)]
pub struct WanBenchOptions {
    pub seconds: f64,
    pub vms: u32,
    pub disk_size: u64,
    pub tag_interval: Duration,
    pub seed: u64,
    /// Steady churn, bytes per second over all disks (`None`: flat out).
    pub rate_bytes_per_s: Option<u64>,
    /// Run the rsync comparison (needs `rsync`).
    pub rsync: bool,
    /// The WAN link's rate, Mbit/s (the relay's egress limit; `None`: unlimited).
    /// With a link slower than the churn, a backlog forms and whole intervals between
    /// recovery points are coalesced, as on a real VPN or ExpressRoute link.
    pub link_mbit: Option<u64>,
    /// Run only these models (empty: all).
    pub only: Vec<String>,
    /// A write log captured from a real filesystem (`scripts/capture-fs-writelog`):
    /// replayed as the `fs` model, with the log's own recovery points.
    pub fs_log: Option<std::path::PathBuf>,
}

/// The figures of one content model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    pub logical_bytes: u64,
    pub coalesced_bytes: u64,
    pub zero_elided_bytes: u64,
    pub deduplicated_bytes: u64,
    pub compressed_bytes: u64,
    pub wire_bytes: u64,
    /// logical / wire.
    pub reduction_ratio: f64,
    pub elapsed_s: f64,
    pub logical_mb_per_s: f64,
    pub relay_cpu_s: f64,
    pub relay_cpu_ns_per_byte: f64,
    pub sha256_ns_per_byte: f64,
    pub lz4_ns_per_byte: f64,
    /// zstd (level 3, one streaming context with a 128 MiB window, 3 MiB pieces) on
    /// the same data.
    pub zstd_ns_per_byte: f64,
    pub aead_ns_per_byte: f64,
    pub primitives_ns_per_byte: f64,
    /// relay CPU per logical byte / primitives per byte.
    pub relay_to_primitives: f64,
    pub dedup_hits: u64,
    pub unknown_references: u64,
    pub batches: u64,
    pub compression_skipped_batches: u64,
    pub compression_cpu_s: f64,
    /// Batches by the codec their body travelled with: zstd, lz4, none.
    pub codec_batches: std::collections::BTreeMap<String, u64>,
    /// Share of the compressed body bytes that zstd compressed (the rest: LZ4).
    pub zstd_share: f64,
    pub recovery_points: usize,
    pub verified: bool,
    pub rsync_wire_bytes: Option<u64>,
    pub rsync_s: Option<f64>,
    pub rsync_single_wire_bytes: Option<u64>,
    pub errors: Vec<String>,
}

/// What a model churns: generated content, or a captured filesystem's write log.
#[derive(Debug, Clone)]
enum ModelSource {
    Generated(Content),
    FsLog(std::path::PathBuf),
}

/// The models: name, source, relay flags.
fn models(opts: &WanBenchOptions) -> Vec<(&'static str, ModelSource, Vec<String>)> {
    let g = ModelSource::Generated;
    let mut m = vec![
        ("zeros", g(Content::Zeros), vec![]),
        ("dup", g(Content::Dup), vec![]),
        ("text", g(Content::Text), vec![]),
        ("random", g(Content::Random), vec![]),
        ("mixed", g(Content::Mixed), vec![]),
        (
            "random_lz4_always",
            g(Content::Random),
            vec!["--wan-compression".into(), "always".into()],
        ),
    ];
    if let Some(log) = &opts.fs_log {
        m.push(("fs", ModelSource::FsLog(log.clone()), vec![]));
    }
    m
}

/// Runs every model; returns the JSON object printed as the last line.
pub async fn run(opts: WanBenchOptions, progress: bool) -> anyhow::Result<serde_json::Value> {
    if opts.rsync {
        let ok = Command::new("rsync").arg("--version").output();
        anyhow::ensure!(
            ok.is_ok_and(|o| o.status.success()),
            "rsync is needed for the comparison: run ./scripts/bench-wan (installs it) or pass --no-rsync"
        );
    }
    let mut out = serde_json::Map::new();
    for (name, content, mut relay_args) in models(&opts) {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == name) {
            continue;
        }
        // LZ4 forced on random data measures CPU, which a slow link hides.
        if name == "random_lz4_always" && opts.link_mbit.is_some_and(|m| m < 1000) {
            continue;
        }
        if let Some(mbit) = opts.link_mbit {
            relay_args.extend(["--egress-schedule".into(), format!("other {mbit}mbit")]);
        }
        if progress {
            eprintln!("bench-wan: {name}...");
        }
        let with_rsync = opts.rsync && name != "random_lz4_always";
        let f = run_model(&opts, content, relay_args, with_rsync).await?;
        if progress {
            eprintln!(
                "  {name}: {:.0} MB/s logical, {} -> {} bytes on the wire ({:.1}x), relay {:.2} ns/B vs primitives {:.2} ns/B, codecs {:?}, rsync {:?} bytes, verified {}",
                f.logical_mb_per_s,
                f.logical_bytes,
                f.wire_bytes,
                f.reduction_ratio,
                f.relay_cpu_ns_per_byte,
                f.primitives_ns_per_byte,
                f.codec_batches,
                f.rsync_wire_bytes,
                f.verified
            );
        }
        out.insert(name.to_string(), serde_json::to_value(f)?);
    }
    // What skipping LZ4 for incompressible data saves: the same random churn with
    // compression forced on. Measured by the relay's own LZ4 time per logical byte
    // (the whole-process CPU difference is also given, but run-to-run noise is larger
    // than the effect).
    let per_byte = |m: &str, field: &str| {
        out.get(m).and_then(|v| {
            let logical = v["logical_bytes"].as_f64()?.max(1.0);
            Some(v[field].as_f64()? * 1e9 / logical)
        })
    };
    if let (Some(adaptive), Some(always)) = (
        per_byte("random", "compression_cpu_s"),
        per_byte("random_lz4_always", "compression_cpu_s"),
    ) {
        out.insert(
            "lz4_skip_saves_ns_per_byte".into(),
            serde_json::json!(always - adaptive),
        );
    }
    let cpu = |m: &str| out.get(m).and_then(|v| v["relay_cpu_ns_per_byte"].as_f64());
    if let (Some(adaptive), Some(always)) = (cpu("random"), cpu("random_lz4_always")) {
        out.insert(
            "lz4_skip_relay_cpu_delta_ns_per_byte".into(),
            serde_json::json!(always - adaptive),
        );
    }
    out.insert(
        "setup".into(),
        serde_json::json!({
            "vms": opts.vms,
            "disk_size": opts.disk_size,
            "seconds": opts.seconds,
            "tag_interval_s": opts.tag_interval.as_secs_f64(),
            "profile": "mixed",
            "fs_log": opts.fs_log,
            "rate_bytes_per_s": opts.rate_bytes_per_s,
            "link_mbit": opts.link_mbit,
        }),
    );
    Ok(serde_json::Value::Object(out))
}

async fn run_model(
    opts: &WanBenchOptions,
    source: ModelSource,
    relay_args: Vec<String>,
    with_rsync: bool,
) -> anyhow::Result<ModelFigures> {
    let (plans, log_tags) = model_plans(opts, &source)?;
    let vms: Vec<String> = plans.iter().map(|p| p.id.vm.clone()).collect();
    let mut site = Site::create(
        None,
        SiteOptions {
            agent_vms: vms.clone(),
            cache_capacity: 8 << 30,
            cache_segment_mib: 64,
            mt_credit_mib: 16,
            max_udp_payload: 1452,
            relay_args,
            mt_args: vec![],
        },
    )?;
    site.start_master_target()?;
    site.start_relay()?;
    let relay_pid = site.relay_pid().context("relay pid")?;
    let metrics = site.relay_metrics_addr().context("relay metrics address")?;
    // A log replays whole (its own recovery points), a generator for `seconds`.
    let seconds = if log_tags.is_some() {
        3600.0
    } else {
        opts.seconds
    };
    let agent_opts = AgentOptions {
        drain_timeout: Duration::from_secs(300),
        rate_bytes_per_s: opts.rate_bytes_per_s,
        log_tags,
        ..site.agent_options(Duration::from_secs_f64(seconds), opts.tag_interval)?
    };
    let cpu_before = process_cpu_seconds(relay_pid).unwrap_or(0.0);
    let started = Instant::now();
    let handle = agent::start(agent_opts, plans, opts.seed).map_err(anyhow::Error::msg)?;
    let report = handle.finish().await.map_err(anyhow::Error::msg)?;
    // Done when the relay has nothing left for the master target.
    let text = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let (_, text) = http_get(metrics, "/metrics");
            let backlog = sample_sum(&text, "fbr_relay_cache_backlog_bytes", &[]);
            if (backlog == 0.0 && text.contains("fbr_relay_bytes_total"))
                || Instant::now() > deadline
            {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let relay_cpu_s = process_cpu_seconds(relay_pid).unwrap_or(f64::NAN) - cpu_before;
    // The wire counter moves on scrapes: scrape once more after the drain.
    let (_, text2) = http_get(metrics, "/metrics");
    let text = if text2.is_empty() { text } else { text2 };
    site.stop_relay(false)?;
    site.stop_master_target(false)?;

    let stage = |s: &str| sample_sum(&text, "fbr_relay_vm_bytes_total", &[("stage", s)]) as u64;
    let logical_bytes = stage("logical");
    let wire_bytes = sample(&text, "fbr_relay_bytes_total{stage=\"wire\"}").unwrap_or(0.0) as u64;
    let verification = verify::verify_run(&report, &site.mt_data).await?;

    let manifest = report.manifest.clone();
    let prims = tokio::task::spawn_blocking(move || primitives(&manifest)).await??;
    let (rsync_wire, rsync_s, rsync_single) = if with_rsync {
        let manifest = report.manifest.clone();
        let root = site.root.clone();
        let r = tokio::task::spawn_blocking(move || rsync_comparison(&manifest, &root)).await??;
        (Some(r.0), Some(r.1), Some(r.2))
    } else {
        (None, None, None)
    };
    let relay_cpu_ns_per_byte = relay_cpu_s * 1e9 / logical_bytes.max(1) as f64;
    let codec_body =
        |c: &str| sample_sum(&text, "fbr_relay_codec_body_bytes_total", &[("codec", c)]);
    let zstd_share = codec_body("zstd") / (codec_body("zstd") + codec_body("lz4")).max(1.0);
    // What the relay ran: SHA-256 and AES-GCM on every byte, and the codecs in the mix
    // it chose.
    let primitives_ns_per_byte =
        prims.sha + prims.aead + zstd_share * prims.zstd + (1.0 - zstd_share) * prims.lz4;
    let codec_batches = ["zstd", "lz4", "none"]
        .iter()
        .map(|c| {
            let n = sample_sum(&text, "fbr_relay_codec_batches_total", &[("codec", c)]);
            (c.to_string(), n as u64)
        })
        .collect();
    Ok(ModelFigures {
        logical_bytes,
        coalesced_bytes: stage("coalesced"),
        zero_elided_bytes: stage("zero_elided"),
        deduplicated_bytes: stage("deduplicated"),
        compressed_bytes: stage("compressed"),
        wire_bytes,
        reduction_ratio: logical_bytes as f64 / wire_bytes.max(1) as f64,
        elapsed_s,
        logical_mb_per_s: logical_bytes as f64 / 1e6 / elapsed_s,
        relay_cpu_s,
        relay_cpu_ns_per_byte,
        sha256_ns_per_byte: prims.sha,
        lz4_ns_per_byte: prims.lz4,
        zstd_ns_per_byte: prims.zstd,
        aead_ns_per_byte: prims.aead,
        primitives_ns_per_byte,
        relay_to_primitives: relay_cpu_ns_per_byte / primitives_ns_per_byte,
        dedup_hits: sample(&text, "fbr_relay_dedup_hits_total").unwrap_or(0.0) as u64,
        unknown_references: sample(&text, "fbr_relay_unknown_references_total").unwrap_or(0.0)
            as u64,
        batches: sample(&text, "fbr_relay_batches_total").unwrap_or(0.0) as u64,
        compression_skipped_batches: sample(&text, "fbr_relay_compression_skipped_batches_total")
            .unwrap_or(0.0) as u64,
        compression_cpu_s: sample(&text, "fbr_relay_compression_seconds_total").unwrap_or(0.0),
        codec_batches,
        zstd_share,
        recovery_points: verification.recovery_points_verified,
        verified: verification.verified,
        rsync_wire_bytes: rsync_wire,
        rsync_s,
        rsync_single_wire_bytes: rsync_single,
        errors: verification.errors,
    })
}

/// Up to this many bytes of write data are used to time the primitives.
const PRIMITIVES_SAMPLE: usize = 64 << 20;

/// The disks a model churns, and the recovery points of a log (its own).
fn model_plans(
    opts: &WanBenchOptions,
    source: &ModelSource,
) -> anyhow::Result<(Vec<DiskPlan>, Option<Vec<crate::writelog::LogTag>>)> {
    match source {
        ModelSource::Generated(content) => Ok((
            (0..opts.vms)
                .map(|v| DiskPlan {
                    id: StreamId {
                        vm: format!("vm{}", v + 1),
                        disk: 0,
                    },
                    disk_size: opts.disk_size,
                    group: format!("group{}", v + 1),
                    source: SourceSpec::Generated {
                        seed: opts.seed,
                        vm_index: v,
                        disk_index: 0,
                        profile: Profile::Mixed,
                        content: *content,
                    },
                    start: Default::default(),
                })
                .collect(),
            None,
        )),
        ModelSource::FsLog(path) => {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("the filesystem log {}", path.display()))?;
            let summary = crate::writelog::scan_log(&path)?;
            anyhow::ensure!(
                !summary.disks.is_empty() && !summary.tags.is_empty(),
                "{} declares no disk or no recovery point",
                path.display()
            );
            let plans = summary.plans(&path, "fs");
            Ok((plans, Some(summary.tags)))
        }
    }
}

/// Nanoseconds per byte of each primitive, on the run's own write data.
#[derive(Debug, Clone, Copy)]
struct Primitives {
    sha: f64,
    lz4: f64,
    zstd: f64,
    aead: f64,
}

/// Times the primitives on the run's own write data.
fn primitives(manifest: &Manifest) -> anyhow::Result<Primitives> {
    let pools = ContentPools::new(manifest.seed);
    let mut data = Vec::with_capacity(PRIMITIVES_SAMPLE);
    'disks: for d in &manifest.disks {
        let mut source =
            ChangeSource::open(&d.source, d.disk_size, &pools).map_err(anyhow::Error::msg)?;
        let share = PRIMITIVES_SAMPLE / manifest.disks.len().max(1);
        let start = data.len();
        while data.len() - start < share {
            match source.next_change().map_err(anyhow::Error::msg)? {
                Some(crate::workload::Change::Write { data: d, .. }) => data.extend_from_slice(&d),
                Some(_) => {}
                None => continue 'disks,
            }
        }
    }
    anyhow::ensure!(!data.is_empty(), "no write data to time the primitives on");
    let n = data.len() as f64;
    let t = Instant::now();
    let mut sink = 0u8;
    for block in data.chunks(4096) {
        sink ^= block_hash(block)[0];
    }
    let sha = t.elapsed().as_nanos() as f64 / n;
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(3 << 20)];
    let t = Instant::now();
    for chunk in data.chunks(3 << 20) {
        let k = lz4_flex::block::compress_into(chunk, &mut out).unwrap_or(0);
        sink ^= k as u8;
    }
    let lz4 = t.elapsed().as_nanos() as f64 / n;
    // zstd as a session runs it: one context, its window across the pieces.
    let pool = fbr_protocol::codec::CodecMemory::new(1 << 30);
    let window = fbr_protocol::codec::MAX_WINDOW_LOG;
    let reservation = pool
        .reserve_fair(1, fbr_protocol::codec::MIN_WINDOW_LOG, window, |w| {
            fbr_protocol::codec::compressor_cost(w, 3)
        })
        .context("zstd context memory")?;
    let mut zstd = fbr_protocol::codec::StreamCompressor::new(3, window, reservation)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut piece = Vec::new();
    let t = Instant::now();
    for chunk in data.chunks(3 << 20) {
        piece.clear();
        zstd.compress(chunk, &mut piece)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        sink ^= piece.len() as u8;
    }
    let zstd = t.elapsed().as_nanos() as f64 / n;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7u8; 32])
            .map_err(|_| anyhow::anyhow!("AES-256-GCM key"))?,
    );
    let mut record = vec![0u8; 16384];
    let t = Instant::now();
    for (i, chunk) in data.chunks(16384).enumerate() {
        // TLS records are at most 16 KiB: one seal per record, as rustls does.
        record.truncate(chunk.len());
        record.copy_from_slice(chunk);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut record,
            )
            .map_err(|_| anyhow::anyhow!("AES-256-GCM seal"))?;
        sink ^= tag.as_ref()[0];
    }
    let aead = t.elapsed().as_nanos() as f64 / n;
    std::hint::black_box(sink);
    Ok(Primitives {
        sha,
        lz4,
        zstd,
        aead,
    })
}

/// What rsync sends to keep a copy of each source disk in step, once per recovery
/// point: (total wire bytes, seconds, wire bytes of one rsync first point -> last).
fn rsync_comparison(manifest: &Manifest, root: &Path) -> anyhow::Result<(u64, f64, u64)> {
    let dir = root.join("rsync");
    let rsh = local_rsh(&dir)?;
    let pools = ContentPools::new(manifest.seed);
    let (mut wire, mut secs, mut single) = (0u64, 0f64, 0u64);
    for (i, d) in manifest.disks.iter().enumerate() {
        let mut source =
            ChangeSource::open(&d.source, d.disk_size, &pools).map_err(anyhow::Error::msg)?;
        let mut img = MemoryImage(vec![0; d.disk_size as usize]);
        let snap = dir.join(format!("source-{i}.img"));
        let dest = dir.join(format!("copy-{i}.img"));
        std::fs::File::create(&dest)?.set_len(d.disk_size)?;
        let mut first: Option<Vec<u8>> = None;
        let mut seq = 0u64;
        for tag in &d.tags {
            for s in seq + 1..tag.seq {
                let change = source
                    .next_change()
                    .map_err(anyhow::Error::msg)?
                    .context("source ended early")?;
                apply_record(&change.into_record(s), &mut img)?;
            }
            seq = tag.seq;
            std::fs::File::create(&snap)?.write_all(&img.0)?;
            let (bytes, s) = rsync(&rsh, &snap, &dest)?;
            wire += bytes;
            secs += s;
            first.get_or_insert_with(|| img.0.clone());
        }
        if let Some(first) = first {
            let from = dir.join(format!("first-{i}.img"));
            std::fs::write(&from, &first)?;
            single += rsync(&rsh, &snap, &from)?.0;
        }
    }
    Ok((wire, secs, single))
}

/// A "remote shell" for rsync that runs the remote side locally (drops the host), so
/// rsync really uses its delta algorithm and compression between two local paths.
pub(crate) fn local_rsh(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let rsh = dir.join("local-rsh");
    std::fs::write(
        &rsh,
        "#!/bin/sh\n# rsync's remote shell, run locally: drop the host.\nshift\nexec \"$@\"\n",
    )?;
    std::fs::set_permissions(&rsh, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(rsh)
}

/// One `rsync` of `src` onto `dest` through the local remote shell: (wire bytes, s).
pub(crate) fn rsync(rsh: &Path, src: &Path, dest: &Path) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-I", "--inplace", "--no-whole-file", "-z", "--stats", "-e"])
        .arg(rsh)
        .arg(src)
        .arg(format!("localhost:{}", dest.display()))
        .output()
        .context("running rsync")?;
    let secs = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "rsync failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("rsync --stats lacks {name:?}"))?;
        let digits: String = line.chars().filter(|c| c.is_ascii_digit()).collect();
        digits
            .parse()
            .with_context(|| format!("rsync {name} {line:?}"))
    };
    Ok((
        field("Total bytes sent:")? + field("Total bytes received:")?,
        secs,
    ))
}
