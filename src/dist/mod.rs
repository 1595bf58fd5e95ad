//! Data-parallel training across processes over MPI: `mpirun -np N elrt train|compress ...`.
//!
//! [`init`] (called by the binary before a command runs) notices that mpirun started this
//! process, from the environment it sets, and joins MPI's world; the training pipeline then
//! trains with [`world`] through [`crate::train::parallel`], which holds everything that is not
//! MPI (sharding, the gradient hook, the start check). Without mpirun nothing here runs and
//! `elrt` is a single process, bit for bit as before.
//!
//! MPI is a cargo feature (`--features mpi`, which `scripts/setup.sh`, `scripts/main.sh` and
//! `scripts/test.sh` build): the default build needs no MPI library. A build without it refuses
//! to run under `mpirun -np N` (N > 1) rather than train N separate copies of the model.
//!
//! Failures: an error every rank meets together ([`OnEveryRank`]: a batch that does not divide,
//! ranks started differently) is printed once by rank 0 and every rank exits; an error on one
//! rank alone is printed with its rank and aborts the job (`MPI_Abort`), so that no rank waits
//! forever in a collective. A rank that dies (killed, crashed) is mpirun's to notice: it ends
//! the others and names the rank ("mpirun noticed that process rank 1 ... exited on signal 9").

#[cfg(feature = "mpi")]
mod mpi_world;

use std::sync::{Arc, OnceLock};

use anyhow::Result;

use crate::train::parallel::Collective;
pub use crate::train::parallel::OnEveryRank;

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();

/// `(rank, size)` when mpirun (Open MPI, or a PMI launcher such as MPICH's or Slurm's) started
/// this process.
pub fn launched() -> Option<(usize, usize)> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    for (r, s) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
    ] {
        if let (Some(rank), Some(size)) = (var(r), var(s)) {
            return Some((rank, size));
        }
    }
    None
}

/// The processes of this run on this machine (mpirun's local size), 1 without mpirun.
pub fn local_ranks() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// The MPI world of this process, once [`init`] joined one.
pub fn world() -> Option<Arc<dyn Collective>> {
    WORLD.get().cloned()
}

/// This process's rank (0 without MPI).
pub fn rank() -> usize {
    world().map_or(0, |w| w.rank())
}

/// Compute threads for a rank when the user gave none: the machine's cores shared by the ranks
/// on it (all cores without mpirun).
pub fn default_threads() -> Option<usize> {
    let ranks = local_ranks();
    (world().is_some() && ranks > 1).then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / ranks).max(1)
    })
}

/// Holds MPI open while the command runs; dropping it finalises MPI.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: mpi::environment::Universe,
    rank: usize,
    size: usize,
}

impl Session {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Leaves MPI (`MPI_Finalize`, which waits for the other ranks to leave too).
    pub fn finish(self) {
        #[cfg(feature = "mpi")]
        drop(self._universe);
    }

    /// Ends every rank of the job (after this one printed its error).
    pub fn abort(self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        {
            mpi_world::abort(code)
        }
        #[cfg(not(feature = "mpi"))]
        std::process::exit(code)
    }
}

/// Joins MPI when mpirun started this process; `None` otherwise (or for a job of one process
/// in a build without MPI).
pub fn init() -> Result<Option<Session>> {
    let Some((rank, size)) = launched() else {
        return Ok(None);
    };
    #[cfg(feature = "mpi")]
    {
        let (universe, world) = mpi_world::init(rank, size)?;
        let _ = WORLD.set(world);
        Ok(Some(Session {
            _universe: universe,
            rank,
            size,
        }))
    }
    #[cfg(not(feature = "mpi"))]
    {
        if size > 1 {
            anyhow::bail!(
                "MPI rank {rank} of {size}: this elrt was built without MPI support, so the {size} \
                 processes would train {size} separate models; build it with \
                 `cargo build --release --features mpi` (scripts/setup.sh does)"
            );
        }
        Ok(None)
    }
}
