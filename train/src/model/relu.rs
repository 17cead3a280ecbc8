//! The ReLU hook every architecture's forward pass goes through: ordinary ReLUs, or ReLUs whose
//! 0/1 patterns are recorded and later replayed.
//!
//! Why replay: the parameter gradient of a ReLU network jumps wherever a unit's pre-activation
//! crosses zero, so a finite difference of gradients (gradient matching's mixed derivative in
//! lmc-distill) is dominated by units that flip between the two shifted passes. Replaying the
//! central pass's patterns makes the function differentiated smooth, as double backward does
//! (ReLU'' = 0).

use dfdx::prelude::*;

use crate::ops;

/// ReLU patterns of one forward pass, in the order the ReLUs run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Patterns(pub Vec<Vec<bool>>);

/// What the ReLUs of a pass do.
pub enum Relus<'a> {
    /// Ordinary ReLUs (`Model::forward`; architectures may fuse them with neighbouring ops).
    Plain,
    /// Ordinary ReLUs, and their patterns are appended here.
    Record(&'a mut Patterns),
    /// Each ReLU applies the recorded pattern instead of looking at its input's sign.
    Replay(&'a Patterns),
}

/// A pass's ReLU hook: the mode and the index of the next ReLU.
pub(crate) struct Relu<'r, 'a> {
    mode: &'r mut Relus<'a>,
    next: usize,
}

impl<'r, 'a> Relu<'r, 'a> {
    pub(crate) fn new(mode: &'r mut Relus<'a>) -> Self {
        Relu { mode, next: 0 }
    }

    /// Whether the ReLUs are ordinary, so an architecture may use a fused op containing one
    /// (bit-identical to the unfused ops, which patterns need).
    pub(crate) fn is_plain(&self) -> bool {
        matches!(self.mode, Relus::Plain)
    }

    /// The next ReLU of the pass.
    pub(crate) fn apply<S: Shape, Tp: Tape<f32, Cpu>>(
        &mut self,
        x: Tensor<S, f32, Cpu, Tp>,
    ) -> Tensor<S, f32, Cpu, Tp> {
        let k = self.next;
        self.next += 1;
        match self.mode {
            Relus::Plain => ops::relu(x),
            Relus::Record(p) => relu_pattern(x, Pattern::Record(p)),
            Relus::Replay(p) => {
                let m = p.0.get(k).map(Vec::as_slice).unwrap_or_default();
                relu_pattern(x, Pattern::Replay(m, k))
            }
        }
    }
}

enum Pattern<'p> {
    Record(&'p mut Patterns),
    Replay(&'p [bool], usize),
}

/// `y = x * m` with `m` the recorded (or now recorded, `x > 0`) pattern; backward `dx += dy * m`.
fn relu_pattern<S: Shape, Tp: Tape<f32, Cpu>>(
    x: Tensor<S, f32, Cpu, Tp>,
    pattern: Pattern,
) -> Tensor<S, f32, Cpu, Tp> {
    let x = x.contiguous();
    let shape = *x.shape();
    let (x, mut tape) = x.split_tape();
    let mut y = vec![0.0f32; shape.num_elements()];
    x.copy_into(&mut y);
    let mask: Vec<bool> = match pattern {
        Pattern::Record(p) => {
            let m: Vec<bool> = y.iter().map(|&v| v > 0.0).collect();
            p.0.push(m.clone());
            m
        }
        Pattern::Replay(m, k) => {
            assert_eq!(
                m.len(),
                y.len(),
                "relu_pattern: replayed pattern {k} does not fit this pass"
            );
            m.to_vec()
        }
    };
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
