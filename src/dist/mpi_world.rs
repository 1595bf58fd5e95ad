//! The [`Collective`] over MPI's world communicator (rsmpi over Open MPI).

use std::sync::Arc;

use anyhow::{bail, Result};
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use crate::train::parallel::Collective;

/// MPI_COMM_WORLD. Holds no handle: each call takes the world communicator afresh, so the type
/// is `Send + Sync` without unsafe code. Calls come from one thread at a time (the training
/// loop; BN's sync runs inside its forward and backward), which the `Serialized` threading
/// level [`init`] asks for allows.
struct World {
    rank: usize,
    size: usize,
}

pub fn init(rank: usize, size: usize) -> Result<(mpi::environment::Universe, Arc<dyn Collective>)> {
    let Some((universe, level)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI rank {rank} of {size}: MPI was already initialised");
    };
    if level < Threading::Serialized {
        bail!("MPI rank {rank} of {size}: the MPI library offers threading level {level:?}, elrt needs Serialized");
    }
    let w = universe.world();
    let (r, s) = (w.rank() as usize, w.size() as usize);
    if (r, s) != (rank, size) {
        bail!("MPI: the environment says rank {rank} of {size}, MPI_COMM_WORLD rank {r} of {s}");
    }
    Ok((universe, Arc::new(World { rank, size })))
}

pub fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl Collective for World {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.size];
        SimpleCommunicator::world().all_gather_into(&value, &mut all[..]);
        Ok(all)
    }

    fn barrier(&self) -> Result<()> {
        SimpleCommunicator::world().barrier();
        Ok(())
    }
}
