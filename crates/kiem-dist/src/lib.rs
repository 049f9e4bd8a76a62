//! Collectives between the processes of one job. A run is one process ([`Solo`]) unless the
//! binary was built with the `mpi` feature and launched by `mpirun`; the training loop and data
//! preparation see only [`Collective`], through [`world`].
//!
//! The in-place helpers stage data through a bucket-sized buffer: MPI's safe bindings have no
//! `MPI_IN_PLACE`, and a second parameter-sized buffer would cost as much memory as the
//! gradients themselves.

use std::ops::Range;
use std::sync::OnceLock;

#[cfg(feature = "mpi")]
pub mod mpi_world;

/// The collective operations kiem needs. Sums are elementwise over ranks; every rank calls the
/// same operations in the same order with the same lengths.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `recv` = the sum over ranks of `send`.
    fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]);
    fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]);
    /// `send` holds [`Collective::size`] blocks of `recv.len()`; rank r receives the sum over
    /// ranks of their block r.
    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32]);
    /// `recv` = every rank's `send` (all of one length), in rank order.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]);
    /// Rank 0's `recv` = every rank's `send` (all of one length), in rank order; `recv` is not
    /// touched elsewhere.
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]);
    /// Rank 0's `bytes` on every rank.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>);
    fn barrier(&self);
    /// Ends every process of the job with `code` (this one has reported its error).
    fn abort(&self, code: i32) -> !;
    /// What the job runs on, for logs: "1 process" or "MPI, 4 ranks".
    fn describe(&self) -> String;
}

/// A job of one process: every collective is a copy.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]) {
        recv.copy_from_slice(send);
    }
    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "1 process".into()
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// The job's processes: what [`install`] set, else this process alone.
pub fn world() -> &'static dyn Collective {
    WORLD.get().map_or(&Solo, |w| w.as_ref())
}

/// Sets the job's processes once, at start-up (before [`world`] is first used).
pub fn install(world: Box<dyn Collective>) -> Result<(), String> {
    WORLD
        .set(world)
        .map_err(|_| "the job's processes were set up twice".to_string())
}

/// How many processes a launcher (mpirun/mpiexec of Open MPI, MPICH or a PMI-based one) started
/// for this job, from its environment; `None` when not launched by one.
pub fn launched_ranks() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// How many ranks of this job share this machine (to divide its cores between them).
pub fn local_ranks() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PALS_LOCAL_SIZE",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse().ok())
    .unwrap_or(1)
    .max(1)
}

/// Floats moved per collective call by the in-place helpers (4 MiB).
pub const BUCKET: usize = 1 << 20;

/// Sums `data` over ranks in place, a bucket at a time.
pub fn all_reduce_in_place(world: &dyn Collective, data: &mut [f32], stage: &mut Vec<f32>) {
    if world.size() == 1 {
        return;
    }
    for chunk in data.chunks_mut(BUCKET) {
        stage.clear();
        stage.extend_from_slice(chunk);
        world.all_reduce_f32(stage, chunk);
    }
}

/// How a flat buffer of `len` values splits into one contiguous shard per rank (the last ones
/// shorter or empty when `len` does not divide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shards {
    pub len: usize,
    pub ranks: usize,
    /// Values per shard (the last may hold fewer).
    pub per_rank: usize,
}

impl Shards {
    pub fn new(len: usize, ranks: usize) -> Self {
        Self {
            len,
            ranks,
            per_rank: len.div_ceil(ranks.max(1)),
        }
    }

    pub fn range(&self, rank: usize) -> Range<usize> {
        let start = (rank * self.per_rank).min(self.len);
        start..(start + self.per_rank).min(self.len)
    }
}

/// Sums `data` over ranks into this rank's shard of it (ZeRO's reduce-scatter): afterwards
/// `data[shards.range(rank)]` holds the sums; the rest of `data` is left as it was.
pub fn reduce_scatter_in_place(
    world: &dyn Collective,
    data: &mut [f32],
    shards: Shards,
    stage: &mut Vec<f32>,
) {
    if world.size() == 1 {
        return;
    }
    let mine = shards.range(world.rank());
    let mut received = Vec::new();
    for (offset, block) in shards.buckets() {
        shards.pack(data, offset, block, stage);
        received.clear();
        received.resize(block, 0.0);
        world.reduce_scatter_f32(stage, &mut received);
        let part = clip(mine.clone(), offset, block);
        let n = part.len();
        data[part].copy_from_slice(&received[..n]);
    }
}

/// Gives every rank every rank's shard of `data` (ZeRO's all-gather of updated parameters).
pub fn all_gather_in_place(
    world: &dyn Collective,
    data: &mut [f32],
    shards: Shards,
    stage: &mut Vec<f32>,
) {
    let ranks = world.size();
    if ranks == 1 {
        return;
    }
    let mine = shards.range(world.rank());
    let mut sent = Vec::new();
    for (offset, block) in shards.buckets() {
        sent.clear();
        sent.extend_from_slice(&data[clip(mine.clone(), offset, block)]);
        sent.resize(block, 0.0);
        stage.clear();
        stage.resize(ranks * block, 0.0);
        world.all_gather_f32(&sent, stage);
        shards.unpack(stage, offset, block, data);
    }
}

/// Hands rank 0 every rank's shard of a sharded buffer (`mine` is this rank's), a bucket at a
/// time, so rank 0 never holds the whole buffer (saving ZeRO's sharded optimizer state):
/// `sink(range, values)` receives each window with its place in the whole buffer, on rank 0
/// only. A sink error stops rank 0 at once (the job is then aborted).
pub fn gather_shards_to_root<E>(
    world: &dyn Collective,
    mine: &[f32],
    shards: Shards,
    mut sink: impl FnMut(Range<usize>, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    let (ranks, root) = (world.size(), world.rank() == 0);
    if ranks == 1 {
        return sink(0..mine.len(), mine);
    }
    let (mut sent, mut stage) = (Vec::new(), Vec::new());
    for (offset, block) in shards.buckets() {
        sent.clear();
        sent.extend_from_slice(&mine[offset.min(mine.len())..(offset + block).min(mine.len())]);
        sent.resize(block, 0.0);
        stage.clear();
        if root {
            stage.resize(ranks * block, 0.0);
        }
        world.gather_f32(&sent, &mut stage);
        if root {
            for r in 0..ranks {
                let part = clip(shards.range(r), offset, block);
                let n = part.len();
                sink(part, &stage[r * block..][..n])?;
            }
        }
    }
    Ok(())
}

impl Shards {
    /// The bucket windows of a shard, `(offset, values)`, that the sharded collectives move
    /// one at a time: every rank's values `offset..offset + values` of its shard together.
    fn buckets(&self) -> impl Iterator<Item = (usize, usize)> {
        let per_rank = self.per_rank;
        (0..per_rank)
            .step_by(BUCKET)
            .map(move |offset| (offset, BUCKET.min(per_rank - offset)))
    }

    /// `stage` = each rank's window of `data` in rank order, `block` values apart (zero-padded).
    fn pack(&self, data: &[f32], offset: usize, block: usize, stage: &mut Vec<f32>) {
        stage.clear();
        stage.resize(self.ranks * block, 0.0);
        for r in 0..self.ranks {
            let part = clip(self.range(r), offset, block);
            stage[r * block..][..part.len()].copy_from_slice(&data[part]);
        }
    }

    /// The inverse of [`Shards::pack`]: each rank's window of `data` from `stage`.
    fn unpack(&self, stage: &[f32], offset: usize, block: usize, data: &mut [f32]) {
        for r in 0..self.ranks {
            let part = clip(self.range(r), offset, block);
            let n = part.len();
            data[part].copy_from_slice(&stage[r * block..][..n]);
        }
    }
}

/// The values `offset..offset + block` of a shard (fewer at its end).
fn clip(shard: Range<usize>, offset: usize, block: usize) -> Range<usize> {
    let start = (shard.start + offset).min(shard.end);
    start..(start + block).min(shard.end)
}

#[cfg(test)]
mod tests;
