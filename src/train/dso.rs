//! DSO (double soft orthogonality, [`crate::lowrank::orth`]) applied to a program's
//! parameters: the math lives with the factors in lowrank, on names and plain arrays; this is
//! where training hands it the engine's parameters.

use crate::engine::backend::{Backend, CpuBackend};
use crate::engine::program::Program;
use crate::lowrank::orth::{self, OrthTerm};

/// The factor matrices of the program's low-rank layers ([`orth::terms`]); `param` indexes
/// `program.params`.
pub fn terms(program: &Program) -> Vec<OrthTerm> {
    terms_on(&CpuBackend, program)
}

/// [`terms`] of a program whose tensors live on `backend`.
pub fn terms_on<B: Backend>(backend: &B, program: &Program<B::Tensor>) -> Vec<OrthTerm> {
    orth::terms(
        program
            .params
            .iter()
            .map(|p| (p.name.as_str(), backend.dims(&p.value))),
    )
}

/// Takes the matrices under DSO out of weight decay (`--orth-no-decay`): DSO already holds
/// their scale, and decay pulls their singular values below the 1 that DSO aims at. Cores and
/// every other weight keep their decay.
pub fn exempt_from_decay<T>(program: &mut Program<T>, terms: &[OrthTerm]) {
    for t in terms {
        program.params[t.param].decay = false;
    }
}

/// Adds DSO's gradient to the parameters' gradients; returns the total penalty. The factor
/// matrices are small (rank x channels), so DSO runs on the host: in place on the CPU backend,
/// through a copy on a device backend ([`Backend::with_host`]).
pub fn apply<B: Backend>(
    backend: &B,
    program: &mut Program<B::Tensor>,
    terms: &[OrthTerm],
    rho: f32,
) -> f64 {
    if rho == 0.0 {
        return 0.0;
    }
    let mut total = 0.0;
    for t in terms {
        let p = &mut program.params[t.param];
        let grad = &mut p.grad;
        total += backend.with_host(&p.value, |value| {
            backend.with_host_mut(grad, |grad| orth::add_gradient(value, grad, rho, t.rank))
        });
    }
    total
}
