//! Resync: making a replica equal to a live source disk (sans-IO).
//!
//! ## The hash tree
//! The master target describes its replica as keyed hashes of *nodes* on three levels:
//! regions of 1 MiB ([`REGION_BYTES`], level 0), their 16 chunks of 64 KiB (level 1),
//! and their 16 blocks of 4 KiB (level 2, [`BLOCK_BYTES`]). Node `i` of level `l` covers
//! bytes `[i << shift(l), (i + 1) << shift(l))`, cut at the end of the disk. A node's hash
//! is BLAKE3 keyed with the 32-byte key the agent chose in `HashHello`, over the node's
//! bytes, truncated to 16 bytes ([`NodeHasher`]). The agent compares coarse hashes first
//! and asks for finer ones only below a node that differs, so an unchanged disk costs 16
//! bytes per MiB on the WAN (0.0015%), and a differing 4 KiB block about 300 bytes of
//! hashes.
//!
//! ## Why comparing against a moving replica is safe
//! Neither side stops writing while hashes are computed. Take one byte: the master
//! target read it from some replica state `m` (every record up to `m` applied); the agent
//! compares it with its disk at some position `c`, and `c >= m` because the master target
//! only holds what the agent produced. If the values are equal, the replica after all of
//! the stream's records equals the source: the records in `(m, c]` are in the stream,
//! and applying them to a replica byte equal to the source's at `c` leaves it equal
//! (their effect is already in the source's byte). A byte that differs is sent in a
//! block read *together with* the assignment of its sequence number (the agent holds its
//! write lock), so it lands in order with the writes around it. Torn reads on either
//! side only make bytes look different: sending more is always safe.
//!
//! ## The scanner
//! [`ResyncScanner`] is the agent's side: it decides which hashes to ask for
//! ([`ResyncScanner::poll_request`]), compares the answers with the local disk
//! ([`ResyncScanner::handle_hashes`], the driver supplies local hashes), and says which
//! block ranges to send ([`ResyncScanner::poll_send`]). It tracks, in region order, how far
//! the resync is complete ([`ResyncScanner::next_region`]: every region before it was
//! compared and its differing blocks sent), which the driver writes into `Resync`
//! progress marks so a resync resumes there after any crash. A full copy asks for no
//! hashes: every block is sent.
//!
//! Where nearly every child of a differing node differs too, asking for the children
//! costs more than sending the node whole; the scanner learns that per level from a
//! sample of 1,024 children (and a probe every 32 decisions after it). While a sample's
//! answers are awaited, further differing nodes of that level wait, and no new regions
//! are asked for: the master target answers in order, so anything asked before the
//! sample's requests delays them. For the same reason the window of open regions starts
//! at one batch and doubles with each level-0 answer.
//!
//! ## Invariants
//! - A region counts as done only once every block of it that may differ was handed to
//!   the driver and reported sent.
//! - Answers must match a request that is outstanding, exactly; anything else is
//!   refused ([`ScanError`]), so a hostile peer cannot make the scanner skip a region.
//! - Memory is bounded by [`MAX_OUTSTANDING_NODES`] hashes requested at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::error::ErrorCode;
use crate::frame::{ResyncMode, MAX_HASH_NODES, NODE_HASH_LEN};

/// Levels of the hash tree.
pub const LEVELS: usize = 3;
/// log2 of the node size of each level: 1 MiB, 64 KiB, 4 KiB.
pub const LEVEL_SHIFT: [u32; LEVELS] = [20, 16, 12];
/// Children per node.
pub const FANOUT: u64 = 16;
/// The unit of progress: a level-0 node.
pub const REGION_BYTES: u64 = 1 << LEVEL_SHIFT[0];
/// The finest node: what a delta resync sends.
pub const BLOCK_BYTES: u64 = 1 << LEVEL_SHIFT[LEVELS - 1];
/// Most hashes a scanner has asked for and not yet received.
pub const MAX_OUTSTANDING_NODES: u64 = 64 * 1024;
/// Level-0 nodes asked for in one request (64 MiB of disk for the master target to
/// hash before it answers).
const L0_BATCH: u64 = 64;
/// Most regions started and not done: the comparison runs at most this far (1 GiB)
/// ahead of what was sent, so progress advances region by region.
pub const MAX_OPEN_REGIONS: usize = 1024;
/// Bytes of differing blocks the regions asked for (and not yet answered) are expected
/// to hold, at most: where much differs, the comparison runs only this far ahead of the
/// sending, so a child request (answered in order, behind every region asked before it)
/// comes back before long and the region it holds open closes.
const SEND_AHEAD_BYTES: f64 = 128.0 * 1024.0 * 1024.0;

/// One node hash.
pub type NodeHash = [u8; NODE_HASH_LEN];

/// Nodes of `level` on a disk of `disk_size` bytes.
pub fn node_count(level: u8, disk_size: u64) -> u64 {
    disk_size.div_ceil(1 << LEVEL_SHIFT[level as usize])
}

/// Regions (level-0 nodes) of a disk.
pub fn regions(disk_size: u64) -> u64 {
    node_count(0, disk_size)
}

/// The bytes node `index` of `level` covers, `(offset, len)`; `None` beyond the disk.
pub fn node_range(level: u8, index: u64, disk_size: u64) -> Option<(u64, u64)> {
    let shift = LEVEL_SHIFT[level as usize];
    let start = index.checked_mul(1 << shift)?;
    if start >= disk_size {
        return None;
    }
    Some((start, (1u64 << shift).min(disk_size - start)))
}

/// Keyed BLAKE3 over node bytes, truncated to 16 bytes. All-zero nodes (sparse disks
/// are mostly holes) are recognised and their hash remembered per length.
#[derive(Debug, Clone)]
pub struct NodeHasher {
    key: [u8; 32],
    zero: HashMap<usize, NodeHash>,
}

impl NodeHasher {
    pub fn new(key: [u8; 32]) -> Self {
        NodeHasher {
            key,
            zero: HashMap::new(),
        }
    }

    pub fn hash(&mut self, data: &[u8]) -> NodeHash {
        if crate::wan::is_zero(data) {
            return self.zero_hash(data.len());
        }
        Self::keyed(&self.key, data)
    }

    /// The hash of `len` zero bytes (a hole), without reading or scanning anything.
    pub fn zero_hash(&mut self, len: usize) -> NodeHash {
        let key = self.key;
        *self
            .zero
            .entry(len)
            .or_insert_with(|| Self::keyed(&key, &vec![0u8; len]))
    }

    fn keyed(key: &[u8; 32], data: &[u8]) -> NodeHash {
        let full = blake3::keyed_hash(key, data);
        let mut out = [0u8; NODE_HASH_LEN];
        out.copy_from_slice(&full.as_bytes()[..NODE_HASH_LEN]);
        out
    }
}

/// Checks a `HashRequest` against the disk: the nodes it names must exist.
pub fn check_request(
    level: u8,
    first: u64,
    count: u32,
    disk_size: u64,
) -> Result<(), (ErrorCode, String)> {
    if level as usize >= LEVELS || count == 0 || count > MAX_HASH_NODES {
        return Err((
            ErrorCode::MalformedFrame,
            format!("hash request for {count} nodes of level {level}"),
        ));
    }
    let nodes = node_count(level, disk_size);
    match first.checked_add(count as u64) {
        Some(end) if end <= nodes => Ok(()),
        _ => Err((
            ErrorCode::OutOfBounds,
            format!(
                "hash request for nodes {first}..+{count} of level {level}, but the disk of {disk_size} bytes has {nodes}"
            ),
        )),
    }
}

/// The master target's answer to a checked request: hashes of the nodes, read with
/// `read(offset, buf)` (the replica's bytes), which returns `true` instead when the
/// range is a hole it did not read (all zeros: a sparse disk's empty stretches cost
/// nothing to hash).
pub fn hash_nodes<E>(
    level: u8,
    first: u64,
    count: u32,
    disk_size: u64,
    hasher: &mut NodeHasher,
    buf: &mut Vec<u8>,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<bool, E>,
) -> Result<Vec<NodeHash>, E> {
    let mut out = Vec::with_capacity(count as usize);
    for index in first..first + count as u64 {
        let Some((offset, len)) = node_range(level, index, disk_size) else {
            break;
        };
        buf.resize(len as usize, 0);
        let hole = read(offset, buf)?;
        out.push(if hole {
            hasher.zero_hash(len as usize)
        } else {
            hasher.hash(buf)
        });
    }
    Ok(out)
}

/// Which regions a resync covers, in ascending order: runs `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSet {
    runs: Vec<(u64, u64)>,
    /// Regions in the runs before each run.
    before: Vec<u64>,
}

impl RegionSet {
    /// `start..end` (a whole disk, or the rest of one after a resume).
    pub fn range(start: u64, end: u64) -> Self {
        Self::runs(vec![(start, end)])
    }

    /// Runs `[start, end)`, in any order, overlapping or not (they are merged).
    pub fn runs(mut runs: Vec<(u64, u64)>) -> Self {
        runs.retain(|(a, b)| a < b);
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (a, b) in runs {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut before = Vec::with_capacity(merged.len());
        let mut n = 0;
        for (a, b) in &merged {
            before.push(n);
            n += b - a;
        }
        RegionSet {
            runs: merged,
            before,
        }
    }

    /// Regions in the set.
    pub fn len(&self) -> u64 {
        match (self.runs.last(), self.before.last()) {
            (Some((a, b)), Some(n)) => n + (b - a),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The set's `i`-th region.
    fn get(&self, i: u64) -> Option<u64> {
        let run = self.before.partition_point(|n| *n <= i).checked_sub(1)?;
        let (a, b) = self.runs[run];
        Some(a + (i - self.before[run])).filter(|r| *r < b)
    }

    /// How many of the set's regions lie before `region`.
    fn position_of(&self, region: u64) -> u64 {
        let run = self.runs.partition_point(|(a, _)| *a <= region);
        match run.checked_sub(1) {
            None => 0,
            Some(i) => {
                let (a, b) = self.runs[i];
                self.before[i] + (region.min(b) - a)
            }
        }
    }
}

/// A run of bytes to read from the source disk and send (within one region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRange {
    pub region: u64,
    pub offset: u64,
    pub len: u64,
}

/// Why a scanner refused an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScanError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    level: u8,
    first: u64,
    count: u32,
}

/// How often the children of a differing node differ too (decayed counts): when nearly
/// all do, asking for their hashes costs more than sending the node whole.
#[derive(Debug, Clone, Copy, Default)]
struct Descent {
    children: f64,
    differing: f64,
    decisions: u64,
    /// Children asked for and not answered yet. Once the sample is asked for, further
    /// differing nodes wait for its answers (see `ResyncScanner::deferred`), or the
    /// whole pipeline (up to a GiB of regions) would be descended into before the first
    /// answer taught anything.
    pending: u64,
}

/// Children seen before the scanner trusts its estimate.
const DESCENT_SAMPLE: f64 = 1024.0;
/// Every this many decisions, it descends anyway, to keep the estimate current.
const DESCENT_PROBE: u64 = 32;

impl Descent {
    /// Whether to ask for the children of a differing node of `node_len` bytes, or send
    /// it whole: descend while the bytes expected to be equal (so saved) exceed twice
    /// what the children's hashes cost.
    fn worth_it(&mut self, node_len: u64) -> bool {
        self.decisions += 1;
        if self.children < DESCENT_SAMPLE || self.decisions % DESCENT_PROBE == 0 {
            return true;
        }
        let equal = 1.0 - self.differing / self.children;
        equal * node_len as f64 > 2.0 * (FANOUT as usize * NODE_HASH_LEN) as f64
    }

    /// Whether the sample was asked for and its answers are awaited: decisions wait.
    fn awaiting_sample(&self) -> bool {
        self.children < DESCENT_SAMPLE && self.children + self.pending as f64 >= DESCENT_SAMPLE
    }

    fn learn(&mut self, children: usize, differing: usize) {
        self.pending = self.pending.saturating_sub(children as u64);
        self.children += children as f64;
        self.differing += differing as f64;
        if self.children > 64.0 * DESCENT_SAMPLE {
            self.children /= 2.0;
            self.differing /= 2.0;
        }
    }
}

/// The agent's side of one resync (see the module documentation).
#[derive(Debug, Clone)]
pub struct ResyncScanner {
    disk_size: u64,
    mode: ResyncMode,
    set: RegionSet,
    /// Position in `set` of the next region to request (or, in full mode, to send).
    cursor: u64,
    /// Requests waiting to be sent (children of differing nodes), by the disk offset
    /// they start at: the earliest region is finished first, so progress advances
    /// region by region and the ETA follows a steady rate.
    queued: BTreeMap<(u64, u8), Request>,
    /// Requests sent and not answered, oldest first.
    outstanding: VecDeque<Request>,
    outstanding_nodes: u64,
    /// Regions started and not done: region -> open work items (requests and sends).
    open: BTreeMap<u64, u32>,
    to_send: VecDeque<SendRange>,
    compared_bytes: u64,
    sent_bytes: u64,
    /// Per parent level: whether descending below a differing node pays.
    descent: [Descent; LEVELS - 1],
    /// Per parent level: differing nodes `(index, offset, len)` whose descent waits for
    /// the sample's answers (their regions stay open).
    deferred: [Vec<(u64, u64, u64)>; LEVELS - 1],
    /// Regions that may be open at once: starts at one batch and doubles with each
    /// level-0 answer, up to `MAX_OPEN_REGIONS`. The master target answers requests in
    /// order, so a child request waits behind every region already asked for: a full
    /// window sent blind at the start would hold up the descent sample (and every
    /// region's progress) until the whole window was hashed.
    window: u64,
}

impl ResyncScanner {
    /// A resync of `set` (regions of a disk of `disk_size` bytes) in `mode`.
    pub fn new(disk_size: u64, mode: ResyncMode, set: RegionSet) -> Self {
        ResyncScanner {
            disk_size,
            mode,
            set,
            cursor: 0,
            queued: BTreeMap::new(),
            outstanding: VecDeque::new(),
            outstanding_nodes: 0,
            open: BTreeMap::new(),
            to_send: VecDeque::new(),
            compared_bytes: 0,
            sent_bytes: 0,
            descent: [Descent::default(); LEVELS - 1],
            deferred: Default::default(),
            window: L0_BATCH,
        }
    }

    /// The whole disk from region `from` on (0: from the start; a resume point otherwise).
    pub fn whole_disk(disk_size: u64, mode: ResyncMode, from: u64) -> Self {
        let end = regions(disk_size);
        ResyncScanner::new(disk_size, mode, RegionSet::range(from.min(end), end))
    }

    // --- inputs ---------------------------------------------------------------------

    /// The hashes the master target sent for one request; `local(level, index)` hashes
    /// the same node of the source disk (the driver reads it). Differing nodes are
    /// descended into, differing blocks become ranges to send.
    pub fn handle_hashes<E: std::fmt::Display>(
        &mut self,
        level: u8,
        first: u64,
        hashes: &[NodeHash],
        mut local: impl FnMut(u8, u64) -> Result<NodeHash, E>,
    ) -> Result<(), ScanError> {
        let pos = self
            .outstanding
            .iter()
            .position(|r| r.level == level && r.first == first)
            .ok_or_else(|| {
                ScanError(format!(
                    "hashes for level {level} from node {first} were not asked for"
                ))
            })?;
        let req = self.outstanding[pos];
        let expected = (req.first..req.first + req.count as u64)
            .take_while(|i| node_range(level, *i, self.disk_size).is_some())
            .count();
        if hashes.len() != expected {
            return Err(ScanError(format!(
                "{} hashes for level {level} from node {first}, {expected} asked for",
                hashes.len()
            )));
        }
        self.outstanding.remove(pos);
        self.outstanding_nodes -= req.count as u64;
        let mut differing = 0;
        for (index, theirs) in (first..).zip(hashes) {
            let (offset, len) =
                node_range(level, index, self.disk_size).expect("counted within the disk");
            let ours = local(level, index)
                .map_err(|e| ScanError(format!("reading the source disk at {offset}: {e}")))?;
            if level == 0 {
                self.compared_bytes += len;
            }
            if ours == *theirs {
                continue;
            }
            differing += 1;
            if (level as usize) + 1 == LEVELS {
                self.push_send(offset >> LEVEL_SHIFT[0], offset, len);
            } else if self.descent[level as usize].awaiting_sample() {
                *self.open.entry(offset >> LEVEL_SHIFT[0]).or_insert(0) += 1;
                self.deferred[level as usize].push((index, offset, len));
            } else {
                self.descend_or_send(level, index, offset, len);
            }
        }
        if level > 0 {
            let parent = level as usize - 1;
            self.descent[parent].learn(hashes.len(), differing);
            if !self.descent[parent].awaiting_sample() {
                for (index, offset, len) in std::mem::take(&mut self.deferred[parent]) {
                    self.descend_or_send(parent as u8, index, offset, len);
                    self.close(offset >> LEVEL_SHIFT[0]);
                }
            }
        }
        // The request's own work item (one per region for level 0) is done.
        if level == 0 {
            self.window = (self.window * 2).min(MAX_OPEN_REGIONS as u64);
            // Level-0 requests open their regions when sent; close each one.
            for index in first..first + hashes.len() as u64 {
                self.close(index);
            }
        } else {
            let (offset, _) = node_range(level, first, self.disk_size).expect("a checked request");
            self.close(offset >> LEVEL_SHIFT[0]);
        }
        Ok(())
    }

    /// The driver emitted records for `range` (read together with their sequence
    /// numbers).
    pub fn sent(&mut self, range: SendRange) {
        self.sent_bytes += range.len;
        self.close(range.region);
    }

    /// The hash stream broke: requests not answered are asked again.
    pub fn reconnected(&mut self) {
        while let Some(r) = self.outstanding.pop_back() {
            self.queue(r);
        }
        self.outstanding_nodes = 0;
    }

    // --- outputs ----------------------------------------------------------------------

    /// The next `HashRequest` to send, `(level, first, count)`, while the window of
    /// outstanding hashes allows (never in full mode).
    pub fn poll_request(&mut self) -> Option<(u8, u64, u32)> {
        if self.mode == ResyncMode::Full {
            return None;
        }
        let next = match self.queued.first_key_value() {
            Some((_, r)) => *r,
            None => {
                // While a sample's answers are awaited, the stream stays clear for them.
                if self.open.len() as u64 >= self.window.min(self.send_ahead_regions())
                    || self.descent.iter().any(Descent::awaiting_sample)
                {
                    return None;
                }
                let first = self.set.get(self.cursor)?;
                // A run of consecutive regions of the set, in one request.
                let mut count = 1u64;
                while count < L0_BATCH && self.set.get(self.cursor + count) == Some(first + count) {
                    count += 1;
                }
                Request {
                    level: 0,
                    first,
                    count: count as u32,
                }
            }
        };
        if self.outstanding_nodes + next.count as u64 > MAX_OUTSTANDING_NODES
            && !self.outstanding.is_empty()
        {
            return None;
        }
        if self.queued.first_key_value().map(|(_, r)| r) == Some(&next) {
            self.queued.pop_first();
        } else {
            self.cursor += next.count as u64;
            for region in next.first..next.first + next.count as u64 {
                *self.open.entry(region).or_insert(0) += 1;
            }
        }
        self.outstanding.push_back(next);
        self.outstanding_nodes += next.count as u64;
        Some((next.level, next.first, next.count))
    }

    /// The next range of the source disk to read and send. In full mode, whole regions
    /// in order; in delta mode, the differing blocks found so far.
    pub fn poll_send(&mut self) -> Option<SendRange> {
        if self.mode == ResyncMode::Full && self.to_send.is_empty() {
            let region = self.set.get(self.cursor)?;
            self.cursor += 1;
            let (offset, len) = node_range(0, region, self.disk_size)?;
            self.compared_bytes += len;
            *self.open.entry(region).or_insert(0) += 1;
            return Some(SendRange {
                region,
                offset,
                len,
            });
        }
        self.to_send.pop_front()
    }

    /// Regions before this one (in the disk's order) are done: compared, and their
    /// differing blocks sent. What a progress mark records.
    pub fn next_region(&self) -> u64 {
        match self.open.keys().next() {
            Some(r) => *r,
            None => self
                .set
                .get(self.cursor)
                .unwrap_or_else(|| regions(self.disk_size)),
        }
    }

    /// Whether every region of the set is done.
    pub fn is_done(&self) -> bool {
        self.open.is_empty() && self.set.get(self.cursor).is_none() && self.to_send.is_empty()
    }

    /// Regions the resync covers.
    pub fn regions_total(&self) -> u64 {
        self.set.len()
    }

    /// Regions of the set done so far.
    pub fn regions_done(&self) -> u64 {
        self.set.position_of(self.next_region())
    }

    pub fn mode(&self) -> ResyncMode {
        self.mode
    }

    /// Disk bytes compared so far (a full copy counts what it read).
    pub fn compared_bytes(&self) -> u64 {
        self.compared_bytes
    }

    /// Bytes of blocks sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    // --- internals --------------------------------------------------------------------

    /// How many regions may be open so that their differing blocks, at the share of
    /// the disk sent so far, stay within `SEND_AHEAD_BYTES`.
    fn send_ahead_regions(&self) -> u64 {
        if self.compared_bytes == 0 || self.sent_bytes == 0 {
            return MAX_OPEN_REGIONS as u64;
        }
        let share = self.sent_bytes as f64 / self.compared_bytes as f64;
        (SEND_AHEAD_BYTES / (share * REGION_BYTES as f64))
            .clamp(L0_BATCH as f64, MAX_OPEN_REGIONS as f64) as u64
    }

    /// A differing node of a level with children: ask for their hashes, or send it
    /// whole where that costs less.
    fn descend_or_send(&mut self, level: u8, index: u64, offset: u64, len: u64) {
        let region = offset >> LEVEL_SHIFT[0];
        if !self.descent[level as usize].worth_it(len) {
            self.push_send(region, offset, len);
            return;
        }
        let child_level = level + 1;
        let first_child = index * FANOUT;
        let count = (first_child..first_child + FANOUT)
            .take_while(|c| node_range(child_level, *c, self.disk_size).is_some())
            .count() as u32;
        self.descent[level as usize].pending += count as u64;
        *self.open.entry(region).or_insert(0) += 1;
        self.queue(Request {
            level: child_level,
            first: first_child,
            count,
        });
    }

    fn queue(&mut self, r: Request) {
        let offset = r.first << LEVEL_SHIFT[r.level as usize];
        self.queued.insert((offset, r.level), r);
    }

    fn push_send(&mut self, region: u64, offset: u64, len: u64) {
        // Adjacent blocks of one region go as one range.
        if let Some(last) = self.to_send.back_mut() {
            if last.region == region && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.to_send.push_back(SendRange {
            region,
            offset,
            len,
        });
        *self.open.entry(region).or_insert(0) += 1;
    }

    fn close(&mut self, region: u64) {
        if let Some(n) = self.open.get_mut(&region) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&region);
            }
        }
    }
}

/// A measured rate and the time left at it: the resync's (and later any job's) ETA.
/// Sans-IO: samples come with their time.
///
/// The rate is measured over the last `window`, and never over more than the later half
/// of the time since the first sample: a job's start (pipelines filling, caches warming)
/// is slower or faster than its steady state, and an ETA taken early would carry that
/// start into the whole remainder.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    window: Duration,
    first: Option<Instant>,
    samples: VecDeque<(Instant, u64)>,
}

impl RateEstimator {
    /// A rate measured over the last `window`.
    pub fn new(window: Duration) -> Self {
        RateEstimator {
            window,
            first: None,
            samples: VecDeque::new(),
        }
    }

    /// `done` units were done in all at `now`.
    pub fn observe(&mut self, now: Instant, done: u64) {
        self.first.get_or_insert(now);
        self.samples.push_back((now, done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Units per second over the window, once two samples at least 100 ms apart exist.
    pub fn rate(&self) -> Option<f64> {
        let (t1, d1) = *self.samples.back()?;
        let span = t1.duration_since(self.first?).min(2 * self.window) / 2;
        // The oldest sample within the span; at least the one before the last.
        let (t0, d0) = self
            .samples
            .iter()
            .find(|(t, _)| t1.duration_since(*t) <= span)
            .filter(|(t, _)| *t < t1)
            .or_else(|| self.samples.iter().rev().nth(1))
            .copied()?;
        let dt = t1.duration_since(t0).as_secs_f64();
        (dt >= 0.1).then(|| d1.saturating_sub(d0) as f64 / dt)
    }

    /// How long `remaining` units take at the measured rate.
    pub fn eta(&self, remaining: u64) -> Option<Duration> {
        let rate = self.rate().filter(|r| *r > 0.0)?;
        Some(Duration::from_secs_f64(remaining as f64 / rate))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DISK: u64 = 5 * REGION_BYTES + 3 * 4096 + 1024;

    fn disk(seed: u8) -> Vec<u8> {
        (0..DISK as usize)
            .map(|i| (i / 4096) as u8 ^ seed)
            .collect()
    }

    /// Runs a scanner between a replica and a source; returns the ranges it sent and the
    /// hash bytes it asked for.
    fn scan(replica: &[u8], source: &[u8], mode: ResyncMode) -> (Vec<SendRange>, u64) {
        let mut hasher = NodeHasher::new([7; 32]);
        let mut local_hasher = hasher.clone();
        let mut scanner = ResyncScanner::whole_disk(DISK, mode, 0);
        let mut sent = Vec::new();
        let mut hash_bytes = 0;
        let mut buf = Vec::new();
        for _ in 0..10_000 {
            while let Some((level, first, count)) = scanner.poll_request() {
                check_request(level, first, count, DISK).unwrap();
                let hashes =
                    hash_nodes(level, first, count, DISK, &mut hasher, &mut buf, |o, b| {
                        b.copy_from_slice(&replica[o as usize..o as usize + b.len()]);
                        Ok::<_, String>(false)
                    })
                    .unwrap();
                hash_bytes += 16 * hashes.len() as u64;
                scanner
                    .handle_hashes(level, first, &hashes, |l, i| {
                        let (o, n) = node_range(l, i, DISK).unwrap();
                        Ok::<_, String>(local_hasher.hash(&source[o as usize..(o + n) as usize]))
                    })
                    .unwrap();
            }
            while let Some(r) = scanner.poll_send() {
                sent.push(r);
                scanner.sent(r);
            }
            if scanner.is_done() {
                return (sent, hash_bytes);
            }
        }
        panic!("the scan did not finish");
    }

    fn apply(replica: &mut [u8], source: &[u8], sent: &[SendRange]) {
        for r in sent {
            let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
            replica[a..b].copy_from_slice(&source[a..b]);
        }
    }

    #[test]
    fn equal_disks_cost_one_hash_per_region() {
        let d = disk(1);
        let (sent, hash_bytes) = scan(&d, &d, ResyncMode::Delta);
        assert!(sent.is_empty());
        assert_eq!(hash_bytes, 16 * regions(DISK));
    }

    #[test]
    fn only_differing_blocks_are_sent_and_the_replica_ends_equal() {
        let source = disk(1);
        let mut replica = source.clone();
        // One sector in region 0, a whole 64 KiB chunk in region 2, the partial tail.
        replica[100] ^= 1;
        for b in &mut replica[2 * REGION_BYTES as usize..][..65536] {
            *b ^= 0xFF;
        }
        let last = replica.len() - 10;
        replica[last] ^= 1;
        let (sent, _) = scan(&replica, &source, ResyncMode::Delta);
        let bytes: u64 = sent.iter().map(|r| r.len).sum();
        assert_eq!(bytes, 4096 + 65536 + 1024, "{sent:?}");
        apply(&mut replica, &source, &sent);
        assert!(replica == source);
    }

    #[test]
    fn where_everything_differs_it_stops_asking_for_fine_hashes() {
        // A disk of 128 MiB whose every block differs: after a sample, regions are sent
        // whole instead of asking for their 64 KiB and 4 KiB hashes. Requests are
        // answered only once the window is full (a deep pipeline), so the sample must
        // not be taken from regions asked for long before the first answer.
        const BIG: u64 = 128 << 20;
        let mut hasher = NodeHasher::new([5; 32]);
        let mut local = hasher.clone();
        let mut s = ResyncScanner::whole_disk(BIG, ResyncMode::Delta, 0);
        let (mut hash_bytes, mut sent) = (0u64, 0u64);
        let mut buf = Vec::new();
        let theirs = |o: u64, b: &mut [u8]| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = ((o as usize + i) / 4096) as u8 ^ 0x55;
            }
        };
        // Regions asked for before the first child request: what the sample's
        // requests wait behind at the master target.
        let (mut regions_asked, mut before_first_child) = (0u64, None);
        while !s.is_done() {
            let mut in_flight = Vec::new();
            while let Some(request) = s.poll_request() {
                in_flight.push(request);
            }
            for (level, first, count) in in_flight {
                if level == 0 {
                    regions_asked += count as u64;
                } else if before_first_child.is_none() {
                    before_first_child = Some(regions_asked);
                }
                let h = hash_nodes(level, first, count, BIG, &mut hasher, &mut buf, |o, b| {
                    theirs(o, b);
                    Ok::<_, String>(false)
                })
                .unwrap();
                hash_bytes += 16 * h.len() as u64;
                s.handle_hashes(level, first, &h, |l, i| {
                    let (o, n) = node_range(l, i, BIG).unwrap();
                    let mine: Vec<u8> = (o..o + n).map(|x| (x / 4096) as u8).collect();
                    Ok::<_, String>(local.hash(&mine))
                })
                .unwrap();
            }
            while let Some(r) = s.poll_send() {
                sent += r.len;
                s.sent(r);
            }
        }
        assert_eq!(sent, BIG, "everything differs, everything is sent");
        let always_descending = 16 * (128 + 128 * 16 + 128 * 256);
        assert!(
            hash_bytes < always_descending / 4,
            "{hash_bytes} bytes of hashes, {always_descending} when always descending"
        );
        assert_eq!(
            before_first_child,
            Some(L0_BATCH),
            "the sample's requests wait behind one batch of regions, not a full window"
        );
    }

    #[test]
    fn a_full_copy_sends_every_region_and_asks_for_nothing() {
        let source = disk(3);
        let mut replica = vec![0u8; DISK as usize];
        let (sent, hash_bytes) = scan(&replica, &source, ResyncMode::Full);
        assert_eq!(hash_bytes, 0);
        assert_eq!(sent.len() as u64, regions(DISK));
        apply(&mut replica, &source, &sent);
        assert!(replica == source);
    }

    #[test]
    fn progress_counts_only_regions_whose_blocks_were_sent() {
        let source = disk(1);
        let mut replica = source.clone();
        replica[REGION_BYTES as usize + 5] ^= 1; // region 1 differs
        let mut hasher = NodeHasher::new([1; 32]);
        let mut local = hasher.clone();
        let mut s = ResyncScanner::whole_disk(DISK, ResyncMode::Delta, 0);
        let mut buf = Vec::new();
        let mut answer = |s: &mut ResyncScanner, (level, first, count): (u8, u64, u32)| {
            let h = hash_nodes(level, first, count, DISK, &mut hasher, &mut buf, |o, b| {
                b.copy_from_slice(&replica[o as usize..o as usize + b.len()]);
                Ok::<_, String>(false)
            })
            .unwrap();
            s.handle_hashes(level, first, &h, |l, i| {
                let (o, n) = node_range(l, i, DISK).unwrap();
                Ok::<_, String>(local.hash(&source[o as usize..(o + n) as usize]))
            })
            .unwrap();
        };
        let l0 = s.poll_request().unwrap();
        assert_eq!(s.next_region(), 0);
        answer(&mut s, l0);
        assert_eq!(s.next_region(), 1, "region 0 equal; region 1 descends");
        let l1 = s.poll_request().unwrap();
        answer(&mut s, l1);
        let l2 = s.poll_request().unwrap();
        answer(&mut s, l2);
        assert_eq!(s.next_region(), 1, "a block of region 1 is still to send");
        let r = s.poll_send().unwrap();
        assert_eq!((r.region, r.offset, r.len), (1, REGION_BYTES, 4096));
        s.sent(r);
        assert_eq!(s.next_region(), regions(DISK));
        assert!(s.is_done());
    }

    #[test]
    fn answers_that_were_not_asked_for_are_refused() {
        let mut s = ResyncScanner::whole_disk(DISK, ResyncMode::Delta, 0);
        let ok = |_: u8, _: u64| Ok::<_, String>([0u8; 16]);
        assert!(s.handle_hashes(0, 0, &[[0; 16]], ok).is_err());
        let (level, first, count) = s.poll_request().unwrap();
        assert_eq!((level, first, count as u64), (0, 0, regions(DISK)));
        let short = vec![[0u8; 16]; 2];
        assert!(s.handle_hashes(level, first, &short, ok).is_err());
        // After a reconnect the same request is asked again.
        s.reconnected();
        assert_eq!(s.poll_request(), Some((level, first, count)));
    }

    #[test]
    fn requests_beyond_the_disk_are_refused() {
        let n = regions(DISK);
        assert!(check_request(0, 0, n as u32, DISK).is_ok());
        assert_eq!(
            check_request(0, n - 1, 2, DISK).unwrap_err().0,
            ErrorCode::OutOfBounds
        );
        assert_eq!(
            check_request(3, 0, 1, DISK).unwrap_err().0,
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            check_request(2, u64::MAX, 2, DISK).unwrap_err().0,
            ErrorCode::OutOfBounds
        );
    }

    #[test]
    fn a_resume_and_a_region_list_cover_only_their_regions() {
        let mut s = ResyncScanner::whole_disk(DISK, ResyncMode::Full, 3);
        let mut seen = Vec::new();
        while let Some(r) = s.poll_send() {
            seen.push(r.region);
            s.sent(r);
        }
        assert_eq!(seen, vec![3, 4, 5]);
        let mut s = ResyncScanner::new(
            DISK,
            ResyncMode::Full,
            RegionSet::runs(vec![(4, 5), (1, 2)]),
        );
        assert_eq!(s.regions_total(), 2);
        let r = s.poll_send().unwrap();
        assert_eq!(r.region, 1);
        assert_eq!(s.regions_done(), 0);
        s.sent(r);
        assert_eq!(s.regions_done(), 1);
    }

    #[test]
    fn the_eta_follows_the_measured_rate() {
        let t0 = Instant::now();
        let mut e = RateEstimator::new(Duration::from_secs(10));
        assert_eq!(e.eta(100), None);
        e.observe(t0, 0);
        e.observe(t0 + Duration::from_secs(2), 200);
        assert_eq!(e.rate(), Some(100.0));
        assert_eq!(e.eta(500), Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_slow_start_does_not_weigh_on_the_eta() {
        // 4 s filling a pipeline (10 units), then 100 units/s: from 6 s on, the rate is
        // the steady one, while the average since the start is far lower.
        let t0 = Instant::now();
        let mut e = RateEstimator::new(Duration::from_secs(30));
        e.observe(t0, 0);
        e.observe(t0 + Duration::from_secs(4), 10);
        for s in 5..=12u64 {
            e.observe(t0 + Duration::from_secs(s), 10 + (s - 4) * 100);
        }
        assert_eq!(e.rate(), Some(100.0));
        // Over a long job, the window binds: the last 30 s.
        let mut e = RateEstimator::new(Duration::from_secs(30));
        for s in 0..=100u64 {
            e.observe(
                t0 + Duration::from_secs(s),
                if s < 70 { s } else { 70 + (s - 70) * 3 },
            );
        }
        assert_eq!(e.rate(), Some(3.0));
    }
}
