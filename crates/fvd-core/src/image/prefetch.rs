//! Whole-image prefetch: copy the base into the image in the background, then
//! detach the base.
//!
//! Starts from FVD's 2011 algorithm — an EWMA of the throughput of base
//! reads; when it falls below a floor the prefetcher pauses with probability
//! ½ for a random time, so many hosts sharing one storage server do not back
//! off (and come back) in lockstep — and improves it:
//! * it keeps several steps in flight while the guest is idle, so a base
//!   with per-request latency is still read at close to its link rate;
//! * it gets out of the guest's way: once a guest request arrives no step
//!   starts and the steps in flight stop before their next base read (what
//!   they did not copy is visited again); it resumes only after the guest
//!   has been idle for the quiet time (plus a short random delay, so hosts
//!   sharing a base do not resume in lockstep), with small steps that grow
//!   while the guest stays away. A guest that never pauses gets the CPU,
//!   the disk and the link to itself; prefetch finishes once it is idle;
//! * it never exceeds an optional rate cap (bytes per second);
//! * it skips blocks already local or being written (fills lock and re-check);
//! * profile mode fetches the ranges a recorded run read first, then the rest.
//!
//! When every block is local it sets the all-local flag ([`Image::detach_base_if_complete`]),
//! after which I/O skips the bitmap and the base is never opened again.
//! Time and randomness come from a [`Clock`] the host supplies (tokio's
//! timers in `fvd serve`, virtual time in the simulator).

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use super::Image;
use crate::error::Result;
use crate::executor::Clock;

/// Which order to prefetch in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchMode {
    /// Sequentially over the base range.
    Adaptive,
    /// The image's recorded profile first, then the rest sequentially.
    Profile,
}

/// How to prefetch.
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    /// Order.
    pub mode: PrefetchMode,
    /// Wait this long after start.
    pub start_delay: Duration,
    /// Never copy faster than this many bytes per second.
    pub rate_limit: Option<u64>,
    /// Bytes per step.
    pub step_bytes: u64,
    /// Below this base throughput (bytes/s) the prefetcher may pause.
    pub min_throughput: u64,
    /// Longest random pause.
    pub max_pause: Duration,
    /// EWMA weight of the previous estimate (FVD used 0.8).
    pub alpha: f64,
    /// Longest random delay added to the quiet time before resuming.
    pub yield_delay: Duration,
    /// Steps in flight at once while the guest is idle.
    pub depth: usize,
    /// Bytes per step of the first round after the guest was busy (doubled
    /// per round the guest stays away, up to `step_bytes`).
    pub first_step_bytes: u64,
    /// After a guest request, prefetch resumes once the guest has sent none
    /// (and has none in flight) for this long.
    pub quiet: Duration,
    /// Journal the copied blocks (offline prefetch: progress survives a crash).
    pub hard: bool,
    /// With `hard`, flush after this many bytes.
    pub flush_every: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            mode: PrefetchMode::Adaptive,
            start_delay: Duration::ZERO,
            rate_limit: None,
            step_bytes: 1 << 20,
            min_throughput: 5 << 20,
            max_pause: Duration::from_secs(30),
            alpha: 0.8,
            yield_delay: Duration::from_millis(5),
            depth: 4,
            first_step_bytes: 64 << 10,
            quiet: Duration::from_millis(20),
            hard: false,
            flush_every: 64 << 20,
        }
    }
}

/// Prefetch state, for the stats interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrefetchState {
    /// Not started (start delay).
    Waiting = 0,
    /// Copying.
    Running = 1,
    /// Backed off (slow base, or yielding).
    Paused = 2,
    /// Every block is local; the base is detached.
    Done = 3,
    /// Stopped by an error.
    Failed = 4,
    /// Prefetch is off.
    Off = 5,
}

impl PrefetchState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            PrefetchState::Waiting => "waiting",
            PrefetchState::Running => "running",
            PrefetchState::Paused => "paused",
            PrefetchState::Done => "done",
            PrefetchState::Failed => "failed",
            PrefetchState::Off => "off",
        }
    }
}

/// Live progress of a prefetch.
#[derive(Debug)]
pub struct PrefetchStatus {
    state: AtomicU8,
    /// Bytes of the base range still in the base when prefetch started.
    pub total: AtomicU64,
    /// Bytes copied so far.
    pub done: AtomicU64,
    /// Random pauses taken because the base was slow.
    pub pauses: AtomicU64,
    /// Times prefetch stopped for guest requests (and waited for quiet).
    pub yields: AtomicU64,
    /// Latest throughput estimate (bytes/s).
    pub throughput: AtomicU64,
}

impl Default for PrefetchStatus {
    fn default() -> Self {
        PrefetchStatus {
            state: AtomicU8::new(PrefetchState::Off as u8),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            throughput: AtomicU64::new(0),
        }
    }
}

impl PrefetchStatus {
    /// Current state.
    pub fn state(&self) -> PrefetchState {
        match self.state.load(Ordering::Acquire) {
            0 => PrefetchState::Waiting,
            1 => PrefetchState::Running,
            2 => PrefetchState::Paused,
            3 => PrefetchState::Done,
            4 => PrefetchState::Failed,
            _ => PrefetchState::Off,
        }
    }

    /// The state to report for `img`: an image that no longer needs its
    /// base counts as done even when no prefetch ran.
    pub fn reported_state(&self, img: &Image) -> PrefetchState {
        let st = self.state();
        if st == PrefetchState::Off && img.base_range() == 0 && img.header().is_some() {
            PrefetchState::Done
        } else {
            st
        }
    }

    fn set(&self, s: PrefetchState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

/// Copy the base into `img` per `cfg`, then detach the base.
pub async fn prefetch(
    img: Arc<Image>,
    cfg: PrefetchConfig,
    clock: Arc<dyn Clock>,
    status: Arc<PrefetchStatus>,
) -> Result<()> {
    let r = run(&img, &cfg, clock.as_ref(), &status).await;
    if r.is_ok() && img.closed.load(Ordering::Acquire) {
        // Stopped by a close (an online resize may go on with the image
        // reopened): the state is not this run's to set any more.
        return Ok(());
    }
    status.set(if r.is_ok() {
        PrefetchState::Done
    } else {
        PrefetchState::Failed
    });
    r
}

async fn run(
    img: &Image,
    cfg: &PrefetchConfig,
    clock: &dyn Clock,
    status: &PrefetchStatus,
) -> Result<()> {
    status.set(PrefetchState::Waiting);
    if !cfg.start_delay.is_zero() {
        clock.sleep(cfg.start_delay).await;
    }
    let range = img.base_range();
    if range == 0 || img.read_only || img.map.meta.is_none() {
        return Ok(());
    }
    let bs = img.map.block_size;
    let (local, blocks) = img.local_blocks();
    // A prefetch that goes on after an online resize counts on.
    let remaining = blocks.saturating_sub(local) * bs;
    status.total.store(
        status.done.load(Ordering::Relaxed) + remaining,
        Ordering::Relaxed,
    );
    let mut work: Vec<(u64, u64)> = Vec::new();
    if cfg.mode == PrefetchMode::Profile
        && let Some(p) = img.stored_profile().await?
    {
        work.extend(
            p.into_iter()
                .filter(|&(o, _)| o < range)
                .map(|(o, l)| (o, l.min(range - o))),
        );
    }
    work.push((0, range));
    status.set(PrefetchState::Running);
    let mut steps = Steps {
        work,
        index: 0,
        pos: None,
        again: Vec::new(),
    };
    let started = clock.now();
    let mut copied = 0u64;
    let mut since_flush = 0u64;
    let mut ewma: Option<f64> = None;
    let mut calm_rounds = 0u32;
    let mut seen = img.foreground_ops();
    loop {
        if img.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if img.foreground_ops() != seen || img.guest_in_flight() {
            // The guest is back: stay out of its way until it is quiet.
            status.yields.fetch_add(1, Ordering::Relaxed);
            status.set(PrefetchState::Paused);
            wait_quiet(img, cfg, clock).await;
            status.set(PrefetchState::Running);
            seen = img.foreground_ops();
            calm_rounds = 0;
            continue;
        }
        let round_seen = seen;
        let guest_came = || img.foreground_ops() != round_seen || img.guest_in_flight();
        // `depth` steps at once, small in the first round after the guest
        // was busy and doubling per calm round up to `step_bytes`.
        calm_rounds += 1;
        let size = idle_step(cfg, calm_rounds);
        let batch = steps.next_batch(img, cfg.depth.max(1), size.max(bs));
        if batch.is_empty() {
            break;
        }
        let t0 = clock.now();
        let gate = img.enter().await;
        if img.closed.load(Ordering::Acquire) {
            // Closed while waiting for the gate (an online resize).
            return Ok(());
        }
        let fills = batch
            .iter()
            .map(|blocks| {
                Box::pin(img.fill_blocks_until(blocks.clone(), None, cfg.hard, &guest_came))
                    as Pin<Box<dyn Future<Output = Result<(u64, bool)>> + Send + '_>>
            })
            .collect();
        let mut n = 0;
        for (r, blocks) in join_all(fills).await.into_iter().zip(batch) {
            let (filled, stopped) = r?;
            n += filled;
            if stopped {
                // What it did not copy comes next time.
                steps.again.push(blocks);
            }
        }
        drop(gate);
        let took = clock.now() - t0;
        if n > 0 {
            img.stats.prefetch_bytes.fetch_add(n, Ordering::Relaxed);
            status.done.fetch_add(n, Ordering::Relaxed);
            copied += n;
            since_flush += n;
            let sample = n as f64 / took.as_secs_f64().max(1e-6);
            let est = match ewma {
                Some(e) => cfg.alpha * e + (1.0 - cfg.alpha) * sample,
                None => sample,
            };
            ewma = Some(est);
            status.throughput.store(est as u64, Ordering::Relaxed);
            if est < cfg.min_throughput as f64 && clock.random().is_multiple_of(2) {
                // Slow base, probably contended: back off for a random time.
                status.set(PrefetchState::Paused);
                status.pauses.fetch_add(1, Ordering::Relaxed);
                let max = cfg.max_pause.as_millis().max(1) as u64;
                clock
                    .sleep(Duration::from_millis(1 + clock.random() % max))
                    .await;
                ewma = None;
                status.set(PrefetchState::Running);
            }
        }
        if let Some(cap) = cfg.rate_limit.filter(|&c| c > 0) {
            let due = Duration::from_secs_f64(copied as f64 / cap as f64);
            let elapsed = clock.now() - started;
            if due > elapsed {
                clock.sleep(due - elapsed).await;
            }
        }
        if cfg.hard && since_flush >= cfg.flush_every {
            img.flush().await?;
            since_flush = 0;
        }
    }
    img.flush().await?;
    img.detach_base_if_complete().await?;
    Ok(())
}

/// Wait until the guest has sent no request, and has none in flight, for
/// the quiet time (plus a random delay of up to `yield_delay`), or the
/// image closed.
async fn wait_quiet(img: &Image, cfg: &PrefetchConfig, clock: &dyn Clock) {
    let jitter = cfg.yield_delay.as_micros().max(1) as u64;
    clock
        .sleep(Duration::from_micros(clock.random() % jitter))
        .await;
    loop {
        let seen = img.foreground_ops();
        clock.sleep(cfg.quiet.max(Duration::from_micros(1))).await;
        let calm = img.foreground_ops() == seen && !img.guest_in_flight();
        if calm || img.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Bytes per step of the `n`th calm round in a row (from 1): the first
/// step size, doubled per round, up to `step_bytes`.
fn idle_step(cfg: &PrefetchConfig, n: u32) -> u64 {
    let first = cfg.first_step_bytes.clamp(1, cfg.step_bytes.max(1));
    first
        .saturating_mul(1 << n.saturating_sub(1).min(20))
        .min(cfg.step_bytes.max(first))
}

/// The block ranges still to copy, in prefetch order.
struct Steps {
    work: Vec<(u64, u64)>,
    index: usize,
    /// Position inside `work[index]`.
    pos: Option<u64>,
    /// Block ranges a step gave up on to yield to the guest: visited first.
    again: Vec<Range<u64>>,
}

impl Steps {
    /// Up to `count` block ranges of about `size` bytes each that are not
    /// yet all local; empty when everything has been visited.
    fn next_batch(&mut self, img: &Image, count: usize, size: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        while out.len() < count
            && let Some(blocks) = self.again.pop()
        {
            if !img.map.all_local(blocks.clone()) {
                out.push(blocks);
            }
        }
        while out.len() < count && self.index < self.work.len() {
            let (off, len) = self.work[self.index];
            let pos = self.pos.unwrap_or(off);
            if pos >= off + len {
                self.index += 1;
                self.pos = None;
                continue;
            }
            let step = size.min(off + len - pos);
            self.pos = Some(pos + step);
            let blocks = img.map.blocks_of(pos, step);
            if !img.map.all_local(blocks.clone()) {
                out.push(blocks);
            }
        }
        out
    }
}

/// Run futures concurrently on the current task; results in input order.
pub(crate) async fn join_all<'a, T>(
    mut futs: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

impl Image {
    /// When every block of the base range is in the image (prefetch done):
    /// make the data durable, checkpoint with the all-local flag in the new
    /// header (old bitmap records no longer apply; chunk-table records are
    /// written in place first), and stop consulting the bitmap and the base.
    /// A failure poisons the image. Returns whether the image is now
    /// detached.
    pub async fn detach_base_if_complete(&self) -> Result<bool> {
        let meta = match &self.map.meta {
            Some(m) if !self.read_only => m,
            _ => return Ok(false),
        };
        if self.base_range() == 0 {
            return Ok(true);
        }
        let _gate = self.enter().await;
        if !self.map.all_local(0..self.map.base_blocks) {
            return Ok(false);
        }
        meta.commit(self.storage.as_ref(), &self.stats).await?;
        meta.detach_base(self.storage.as_ref(), &self.stats).await?;
        self.map.detach();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::{PrefetchConfig, idle_step};

    #[test]
    fn idle_steps_grow_from_the_first_step_to_the_full_step() {
        let cfg = PrefetchConfig::default();
        let sizes: Vec<u64> = (1..=5).map(|n| idle_step(&cfg, n) >> 10).collect();
        assert_eq!(sizes, [64, 128, 256, 512, 1024]);
        let big = PrefetchConfig {
            first_step_bytes: 4 << 20,
            ..PrefetchConfig::default()
        };
        assert_eq!(idle_step(&big, 1), 1 << 20, "never above step_bytes");
    }
}
