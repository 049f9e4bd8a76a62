//! [`Collective`] over MPI (the `mpi` crate on the system's Open MPI or MPICH).

use std::sync::Mutex;

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use crate::Collective;

/// `MPI_COMM_WORLD` of an initialized MPI.
pub struct MpiWorld {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
}

// The communicator is a handle to MPI_COMM_WORLD. MPI is initialized with at least
// MPI_THREAD_SERIALIZED, and kiem calls collectives from one thread at a time (the training
// loop's), in the same order on every rank.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Kept until [`finalize`]: dropping it calls MPI_Finalize.
struct Environment(#[allow(dead_code)] Universe);
unsafe impl Send for Environment {}
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// Initializes MPI (once per process).
pub fn init() -> Result<MpiWorld, String> {
    let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
        .ok_or("MPI was initialized already")?;
    if threading < Threading::Serialized {
        return Err(format!(
            "the MPI library offers only {threading:?} threading; kiem needs MPI_THREAD_SERIALIZED \
             (its worker threads are not the thread that called MPI_Init)"
        ));
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    *ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Environment(universe));
    Ok(MpiWorld { comm, rank, size })
}

/// Calls MPI_Finalize (every rank, at the end of a job that succeeded).
pub fn finalize() {
    let env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(env);
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.comm
            .all_reduce_into(send, recv, SystemOperation::sum());
    }
    fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]) {
        self.comm
            .all_reduce_into(send, recv, SystemOperation::sum());
    }
    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.comm
            .reduce_scatter_block_into(send, recv, SystemOperation::sum());
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.comm.all_gather_into(send, recv);
    }
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) {
        let root = self.comm.process_at_rank(0);
        if self.rank == 0 {
            root.gather_into_root(send, recv);
        } else {
            root.gather_into(send);
        }
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let root = self.comm.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
    }
    fn barrier(&self) {
        self.comm.barrier();
    }
    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks", self.size)
    }
}
