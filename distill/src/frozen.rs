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
//! The pass mirrors [`lmc_train::model::Model::forward`] op for op (a test checks they agree bit
//! for bit); architectures it does not know fall back to `Model::forward` (no freezing).

use dfdx::prelude::*;
use lmc_train::model::{Model, ModelSpec, Norm};
use lmc_train::ops::{self, Conv2dCfg, T1, T2, T4};

/// ReLU patterns of one forward pass, in the order the ReLUs run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Patterns(pub Vec<Vec<bool>>);

/// What the ReLUs of a pass do.
pub enum Relus<'a> {
    /// Ordinary ReLUs, and their patterns are appended here.
    Record(&'a mut Patterns),
    /// Each ReLU applies the recorded pattern instead of looking at its input's sign.
    Replay(&'a Patterns),
}

/// `y = x * m` with `m` the recorded (or now recorded, `x > 0`) pattern; backward `dx += dy * m`.
fn relu_pattern<S: Shape, Tp: Tape<f32, Cpu>>(
    x: Tensor<S, f32, Cpu, Tp>,
    relus: &mut Relus,
    k: &mut usize,
) -> Tensor<S, f32, Cpu, Tp> {
    let x = x.contiguous();
    let shape = *x.shape();
    let (x, mut tape) = x.split_tape();
    let mut y = vec![0.0f32; shape.num_elements()];
    x.copy_into(&mut y);
    let mask: Vec<bool> = match relus {
        Relus::Record(p) => {
            let m: Vec<bool> = y.iter().map(|&v| v > 0.0).collect();
            p.0.push(m.clone());
            m
        }
        Relus::Replay(p) => {
            let m = p.0.get(*k).cloned().unwrap_or_default();
            assert_eq!(
                m.len(),
                y.len(),
                "relu_pattern: replayed pattern {k} does not fit this pass"
            );
            m
        }
    };
    *k += 1;
    for (v, &m) in y.iter_mut().zip(&mask) {
        if !m {
            *v = 0.0;
        }
    }
    let out = x.device().tensor_from_vec(y, shape);
    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out_g)?);
            let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
            for ((d, g), &m) in dx.iter_mut().zip(&dy).zip(&mask) {
                if m {
                    *d += g;
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// Hidden widths of the fully connected architectures.
fn hidden(spec: &ModelSpec) -> Option<Vec<usize>> {
    match spec {
        ModelSpec::Mlp { hidden } => Some(hidden.clone()),
        ModelSpec::Lenet300100 => Some(vec![300, 100]),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Whether [`forward`] can freeze this architecture's ReLUs.
pub fn supports(spec: &ModelSpec) -> bool {
    hidden(spec).is_some() || matches!(spec, ModelSpec::ConvNet { .. })
}

/// Logits of `model` for `x` with the input gradient on, like `Model::forward(p, x, true)`, with
/// the ReLUs controlled by `relus`. Falls back to `Model::forward` for an architecture
/// [`supports`] rejects.
pub fn forward<Tp: Tape<f32, Cpu>>(
    model: &Model,
    p: &[T1],
    x: T4<Tp>,
    relus: &mut Relus,
) -> T2<Tp> {
    let mut k = 0usize;
    let last = p.len() - 2;
    if let Some(widths) = hidden(&model.spec) {
        let mut h = ops::flatten(x);
        for (i, &width) in widths.iter().enumerate() {
            h = relu_pattern(ops::linear(h, &p[2 * i], &p[2 * i + 1], width, true), relus, &mut k);
        }
        return ops::linear(h, &p[last], &p[last + 1], model.classes, true);
    }
    let ModelSpec::ConvNet { depth, width, norm } = &model.spec else {
        return model.forward(p, x, true);
    };
    let mut h = x;
    let mut i = 0;
    for _ in 0..*depth {
        let cfg = Conv2dCfg { out_channels: *width, kernel: 3, padding: 1 };
        h = ops::conv2d(h, &p[i], Some(&p[i + 1]), cfg, true);
        i += 2;
        if *norm == Norm::Instance {
            h = ops::instance_norm(h, &p[i], &p[i + 1], 1e-5);
            i += 2;
        }
        h = ops::avg_pool2d(relu_pattern(h, relus, &mut k), 2);
    }
    ops::linear(ops::flatten(h), &p[last], &p[last + 1], model.classes, true)
}
