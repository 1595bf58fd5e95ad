//! DSO (double soft orthogonality, [`crate::lowrank::orth`]) applied to a program's
//! parameters: the math lives with the factors in lowrank, on names and plain arrays; this is
//! where training hands it the engine's parameters.

use crate::engine::program::Program;
use crate::lowrank::orth::{self, OrthTerm};

/// The factor matrices of the program's low-rank layers ([`orth::terms`]); `param` indexes
/// `program.params`.
pub fn terms(program: &Program) -> Vec<OrthTerm> {
    orth::terms(
        program
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.value.shape())),
    )
}

/// Takes the matrices under DSO out of weight decay (`--orth-no-decay`): DSO already holds
/// their scale, and decay pulls their singular values below the 1 that DSO aims at. Cores and
/// every other weight keep their decay.
pub fn exempt_from_decay(program: &mut Program, terms: &[OrthTerm]) {
    for t in terms {
        program.params[t.param].decay = false;
    }
}

/// Adds DSO's gradient to the parameters' gradients; returns the total penalty.
pub fn apply(program: &mut Program, terms: &[OrthTerm], rho: f32) -> f64 {
    if rho == 0.0 {
        return 0.0;
    }
    let mut total = 0.0;
    for t in terms {
        let p = &mut program.params[t.param];
        total += orth::add_gradient(&p.value, &mut p.grad, rho, t.rank);
    }
    total
}
