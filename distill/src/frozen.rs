//! A forward pass whose ReLU activation patterns can be recorded and replayed, for gradient
//! matching's finite-difference mixed derivative.
//!
//! Why: the parameter gradient of a ReLU network jumps wherever a unit's pre-activation crosses
//! zero. ConvNet-3 has ~130,000 ReLU units per MNIST image, and after instance norm their
//! pre-activations sit around zero, so moving the parameters by as little as 1e-5 (in norm) flips
//! about one of them in a batch of ten and the central difference
//! `[grad_S L(theta + eps u) - grad_S L(theta - eps u)] / (2 eps)` picks up that jump divided by
//! `2 eps` — measured on MNIST, noise 30x the signal at every eps f32 can resolve. Double backward
//! (what DC/IDC use in PyTorch) differentiates inside the current linear region (ReLU'' = 0). So
//! do we: the central pass records each ReLU's 0/1 pattern and the two shifted passes replay it,
//! which makes the function differentiated smooth (conv, instance norm, pooling, linear and
//! cross-entropy are) and the difference accurate to O(eps^2).
//!
//! The pass is [`Model::forward_with`]: every architecture routes its ReLUs through the hook, so
//! this module only names the GM use of it (a test checks it agrees with `Model::forward` bit for
//! bit).

use dfdx::prelude::*;
use lmc_train::model::{Model, ModelSpec};
pub use lmc_train::model::{Patterns, Relus};
use lmc_train::ops::{T1, T2, T4};

/// Whether [`forward`] can freeze this architecture's ReLUs: every architecture's forward pass
/// takes the ReLU hook, so all can.
pub fn supports(_spec: &ModelSpec) -> bool {
    true
}

/// Logits of `model` for `x` with the input gradient on, like `Model::forward(p, x, true)`, with
/// the ReLUs controlled by `relus`.
pub fn forward<Tp: Tape<f32, Cpu>>(
    model: &Model,
    p: &[T1],
    x: T4<Tp>,
    relus: &mut Relus,
) -> T2<Tp> {
    model.forward_with(p, x, true, relus)
}
