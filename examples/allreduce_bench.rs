//! The cost of the gradient all-reduce alone, at the sizes data-parallel training sends:
//! `mpirun -np 2 target/release/examples/allreduce_bench [FLOATS...]` times 200
//! `MPI_Allreduce` sums of f32 buffers (after 20 warm-up calls and a barrier before each) and
//! prints, on rank 0, the median and 90th-percentile milliseconds per call. Defaults: ResNet-20's
//! gradient (271,690 values + 1) and its Tucker-2 form's (104,026 + 1 of compress's default
//! ranks), and 1 M values. Build: `cargo build --release --features mpi --example
//! allreduce_bench` (docs/mpi.md).

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::topology::Communicator;

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a value count"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![272_411, 104_026, 1 << 20]
    } else {
        sizes
    };
    for n in sizes {
        let send = vec![1.0f32; n];
        let mut recv = vec![0.0f32; n];
        let mut times = Vec::new();
        for i in 0..220 {
            world.barrier();
            let t0 = std::time::Instant::now();
            world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
            if i >= 20 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        if world.rank() == 0 {
            println!(
                "{} ranks, {:>9} f32 ({:.2} MB): median {:.3} ms, p90 {:.3} ms per all-reduce",
                world.size(),
                n,
                4.0 * n as f64 / 1e6,
                times[times.len() / 2],
                times[times.len() * 9 / 10]
            );
        }
    }
}
