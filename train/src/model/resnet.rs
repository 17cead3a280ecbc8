//! Residual networks of basic blocks, with OpenLTH's module names (`conv`, `bn`,
//! `blocks.{i}.conv1/bn1/conv2/bn2`, `blocks.{i}.shortcut.0/1`, `fc`), as PyTorch's
//! `state_dict` of the twin in `benches/torch/` spells them:
//!
//! - OpenLTH's `cifar_resnet_D_W` (`models/cifar_resnet.py`; Frankle et al.'s ResNet-20 is D = 20,
//!   W = 16): a conv3x3(W) stem -> norm -> ReLU, three stages of n = (D - 2) / 6 blocks of widths
//!   W, 2W, 4W, stride 2 entering stages 2 and 3, global average pool, linear. Initialised as
//!   OpenLTH's defaults for it (`kaiming_normal` weights, `uniform` batch-norm scales).
//! - The CIFAR ResNet-18 / ResNet-10 of DC/IDC and the paper's authors: a conv3x3(W) stem at
//!   stride 1 without max-pool, four stages of 2 (ResNet-18) or 1 (ResNet-10) blocks of widths W,
//!   2W, 4W, 8W at strides 1, 2, 2, 2, average pool, linear. Initialised as PyTorch's defaults,
//!   as their code leaves it.
//!
//! A basic block is `relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))`, convs 3x3 without
//! bias; the shortcut is the identity, or a 1x1 conv (no bias) + norm where the block changes
//! width or stride. The final pool averages the whole last plane (OpenLTH pools over
//! `out.size()[3]`; DC/IDC's `avg_pool2d(out, 4)` is the same on 32x32 inputs), so any input size
//! works: each stride-2 conv maps a side s to floor((s - 1) / 2) + 1, so 28x28 MNIST ends at
//! 7x7 (ResNet-20) or 4x4 (ResNet-18), 8x8 digits at 2x2 or 1x1, and a side that reaches 1 stays
//! 1 (the 3x3 conv then sees one pixel and its zero padding).

use dfdx::prelude::*;

use super::{Architecture, Init, Item, ModelSpec, Norm, Norms, Relu};
use crate::data::ImageShape;
use crate::ops::{self, Conv2dCfg, RunningStats, BN_EPS, T1, T2, T4};
use crate::params::ParamKind;
use crate::Result;

/// Epsilon of the instance-norm variant (PyTorch's `GroupNorm` default, as the ConvNet uses).
const INSTANCE_EPS: f32 = 1e-5;

pub(super) struct ResNet {
    /// Channels of the stem conv.
    stem: usize,
    /// (width, blocks) per stage; every stage after the first enters at stride 2.
    stages: Vec<(usize, usize)>,
    norm: Norm,
    init: Init,
}

/// One basic block: input and output channels and its stride.
struct Block {
    cin: usize,
    cout: usize,
    stride: usize,
}

impl Block {
    fn has_shortcut_conv(&self) -> bool {
        self.stride != 1 || self.cin != self.cout
    }
}

impl ResNet {
    /// OpenLTH's `cifar_resnet_{depth}_{width}`; `depth` is 6n + 2 (checked by the parser).
    pub(super) fn cifar(depth: usize, width: usize, norm: Norm) -> ResNet {
        let n = (depth - 2) / 6;
        ResNet {
            stem: width,
            stages: vec![(width, n), (2 * width, n), (4 * width, n)],
            norm,
            init: Init::OpenLth,
        }
    }

    /// DC/IDC's CIFAR ResNet-18 (`depth` 18) or ResNet-10 (`depth` 10).
    pub(super) fn dc(depth: usize, width: usize, norm: Norm) -> ResNet {
        let b = if depth == 18 { 2 } else { 1 };
        ResNet {
            stem: width,
            stages: (0..4).map(|s| (width << s, b)).collect(),
            norm,
            init: Init::PyTorch,
        }
    }

    fn blocks(&self) -> Vec<Block> {
        let mut c = self.stem;
        let mut out = Vec::new();
        for (s, &(width, count)) in self.stages.iter().enumerate() {
            for j in 0..count {
                let stride = if s > 0 && j == 0 { 2 } else { 1 };
                out.push(Block { cin: c, cout: width, stride });
                c = width;
            }
        }
        out
    }

    /// Number of norm layers that keep running statistics.
    fn batch_norms(&self) -> usize {
        if self.norm != Norm::Batch {
            return 0;
        }
        1 + self.blocks().iter().map(|b| 2 + b.has_shortcut_conv() as usize).sum::<usize>()
    }

    /// The side after every stride-2 conv of the network.
    fn last_side(&self, side: usize) -> usize {
        self.blocks().iter().fold(side, |s, b| (s - 1) / b.stride + 1)
    }

    /// A norm layer's layout entries.
    fn norm_items(&self, items: &mut Vec<Item>, name: &str, c: usize) {
        match self.norm {
            Norm::None => {}
            Norm::Instance => {
                items.push((format!("{name}.weight"), vec![c], ParamKind::NormScale));
                items.push((format!("{name}.bias"), vec![c], ParamKind::NormShift));
            }
            Norm::Batch => {
                items.push((format!("{name}.weight"), vec![c], ParamKind::NormScale));
                items.push((format!("{name}.bias"), vec![c], ParamKind::NormShift));
                items.push((format!("{name}.running_mean"), vec![c], ParamKind::RunningMean));
                items.push((format!("{name}.running_var"), vec![c], ParamKind::RunningVar));
                items.push((
                    format!("{name}.num_batches_tracked"),
                    vec![],
                    ParamKind::BatchesTracked,
                ));
            }
        }
    }
}

/// Where a forward pass stands in the parameter list: the next trained tensor and the next
/// batch norm's running statistics (which sit after every trained tensor).
struct Cursor {
    next: usize,
    state: usize,
}

impl ResNet {
    fn conv<Tp: Tape<f32, Cpu>>(
        &self,
        h: T4<Tp>,
        p: &[T1],
        at: &mut Cursor,
        cfg: Conv2dCfg,
        input_grad: bool,
    ) -> T4<Tp> {
        let y = ops::conv2d(h, &p[at.next], None, cfg, input_grad);
        at.next += 1;
        y
    }

    fn norm<Tp: Tape<f32, Cpu>>(
        &self,
        h: T4<Tp>,
        p: &[T1],
        at: &mut Cursor,
        norms: &mut Norms,
    ) -> T4<Tp> {
        if self.norm == Norm::None {
            return h;
        }
        let (gamma, beta) = (&p[at.next], &p[at.next + 1]);
        at.next += 2;
        if self.norm == Norm::Instance {
            return ops::instance_norm(h, gamma, beta, INSTANCE_EPS);
        }
        let st = at.state;
        at.state += 3;
        match norms {
            Norms::Running => {
                let running = RunningStats {
                    mean: p[st].as_vec(),
                    var: p[st + 1].as_vec(),
                    num_batches_tracked: 0,
                };
                // Running variances are checked finite and non-negative when a vector is read
                // (`Model::check_state`) and stay so under training and interpolation.
                ops::batch_norm_eval(h, gamma, beta, &running, BN_EPS)
                    .expect("batch norm in evaluation mode: running statistics checked on load")
            }
            Norms::Batch | Norms::Collect(_) => {
                let (y, stats) = ops::batch_norm_train(h, gamma, beta, BN_EPS)
                    .expect("batch norm in training mode: batch size checked by check_train_batch");
                if let Norms::Collect(v) = norms {
                    v.push(stats);
                }
                y
            }
        }
    }
}

/// An activation of the evaluation path: values laid out (n, c, h, w), and that shape.
struct Act {
    v: Vec<f32>,
    shape: (usize, usize, usize, usize),
}

impl ResNet {
    /// [`Architecture::embed`] in evaluation mode (running statistics, plain ReLUs, no tape)
    /// with the activations in plain buffers instead of dfdx tensors: the same ops' arithmetic
    /// (`ops::conv2d_slices`, `ops::batch_norm::eval_inplace`) in the same order, so the same
    /// bits, without the copy out of a tensor that every op otherwise starts with, and with the
    /// norms, residual adds and ReLUs in place (evaluation batches are large: one ResNet-20
    /// activation at batch 1000 is 65 MB).
    fn embed_eval<Tp: Tape<f32, Cpu>>(&self, p: &[T1], x: T4<Tp>) -> T2<Tp> {
        let build = crate::cpu::Build::selected();
        let (x, tape) = x.contiguous().split_tape();
        let dev = x.device().clone();
        let input = Act { v: ops::read(&x), shape: *x.shape() };
        drop(x);
        let mut at = Cursor { next: 0, state: p.len() - 3 * self.batch_norms() };
        let conv = |h: &Act, at: &mut Cursor, cfg: Conv2dCfg| {
            let w = &p[at.next];
            at.next += 1;
            let g = ops::conv2d_geometry(h.shape, w, None, cfg);
            let v = ops::conv2d_slices(
                build,
                &g,
                h.shape.0,
                cfg.out_channels,
                &h.v,
                &ops::read(w),
                None,
            );
            Act { v, shape: (h.shape.0, cfg.out_channels, g.ho, g.wo) }
        };
        let norm = |h: &mut Act, slot: BnSlot, relu: bool, residual: Option<&Act>| {
            let (gamma, beta, st) = (&p[slot.param], &p[slot.param + 1], slot.state);
            let running = RunningStats {
                mean: p[st].as_vec(),
                var: p[st + 1].as_vec(),
                num_batches_tracked: 0,
            };
            // As in `norm` and `bn_relu`: running statistics are checked when a vector is read.
            ops::batch_norm::eval_inplace(
                build,
                &mut h.v,
                h.shape,
                gamma,
                beta,
                &running,
                BN_EPS,
                relu,
                residual.map(|r| r.v.as_slice()),
            )
            .expect("batch norm in evaluation mode: running statistics checked on load");
        };
        let mut h = conv(&input, &mut at, Conv2dCfg::new(self.stem, 3, 1));
        drop(input);
        norm(&mut h, self.take_bn(&mut at, &Norms::Running), true, None);
        for b in self.blocks() {
            let cfg = Conv2dCfg::new(b.cout, 3, 1).with_stride(b.stride);
            let mut m = conv(&h, &mut at, cfg);
            norm(&mut m, self.take_bn(&mut at, &Norms::Running), true, None);
            let mut m = conv(&m, &mut at, Conv2dCfg::new(b.cout, 3, 1));
            // The second norm's parameters and statistics come before the shortcut's.
            let slot = self.take_bn(&mut at, &Norms::Running);
            if b.has_shortcut_conv() {
                let sc_cfg = Conv2dCfg::new(b.cout, 1, 0).with_stride(b.stride);
                let mut s = conv(&h, &mut at, sc_cfg);
                norm(&mut s, self.take_bn(&mut at, &Norms::Running), false, None);
                norm(&mut m, slot, true, Some(&s));
            } else {
                norm(&mut m, slot, true, Some(&h));
            }
            h = m;
        }
        let h = dev.tensor_from_vec(h.v, h.shape).put_tape(tape);
        ops::global_avg_pool(h)
    }
}

/// A batch norm's place: its gamma's index, its running statistics' index, and where its batch
/// statistics go in a collected list.
struct BnSlot {
    param: usize,
    state: usize,
    stats_at: usize,
}

impl ResNet {
    /// Takes the next batch norm's slot from the cursor (as [`ResNet::norm`] would use it).
    fn take_bn(&self, at: &mut Cursor, norms: &Norms) -> BnSlot {
        let slot = BnSlot {
            param: at.next,
            state: at.state,
            stats_at: match norms {
                Norms::Collect(v) => v.len(),
                _ => 0,
            },
        };
        at.next += 2;
        at.state += 3;
        slot
    }

    /// `relu(norm(h) + residual)` for batch norm as one op (bit-identical to `norm`, `+` and
    /// the ReLU separately, see `ops::batch_norm_relu_train`); the batch statistics go where
    /// the slot says, so they stay in layout order when a shortcut's norm ran in between.
    fn bn_relu<Tp, R>(
        &self,
        h: T4<Tp>,
        p: &[T1],
        slot: BnSlot,
        norms: &mut Norms,
        residual: Option<T4<R>>,
    ) -> T4<Tp>
    where
        Tp: Tape<f32, Cpu> + Merge<R>,
        R: Tape<f32, Cpu>,
    {
        let (gamma, beta, st) = (&p[slot.param], &p[slot.param + 1], slot.state);
        match norms {
            Norms::Running => {
                let running = RunningStats {
                    mean: p[st].as_vec(),
                    var: p[st + 1].as_vec(),
                    num_batches_tracked: 0,
                };
                // As in `norm`: running statistics are checked when a vector is read, and the
                // residual has the block's output shape.
                ops::batch_norm_relu_eval(h, gamma, beta, &running, BN_EPS, residual)
                    .expect("batch norm in evaluation mode: running statistics checked on load")
            }
            Norms::Batch | Norms::Collect(_) => {
                let (y, stats) = ops::batch_norm_relu_train(h, gamma, beta, BN_EPS, residual)
                    .expect("batch norm in training mode: batch size checked by check_train_batch");
                if let Norms::Collect(v) = norms {
                    v.insert(slot.stats_at, stats);
                }
                y
            }
        }
    }
}

impl Architecture for ResNet {
    fn features(&self, _spec: &ModelSpec, input: ImageShape) -> Result<(Vec<Item>, usize)> {
        let mut items = Vec::new();
        items.push((
            "conv.weight".into(),
            vec![self.stem, input.channels, 3, 3],
            ParamKind::Weight,
        ));
        self.norm_items(&mut items, "bn", self.stem);
        for (i, b) in self.blocks().iter().enumerate() {
            let name = |m: &str| format!("blocks.{i}.{m}");
            items.push((name("conv1.weight"), vec![b.cout, b.cin, 3, 3], ParamKind::Weight));
            self.norm_items(&mut items, &name("bn1"), b.cout);
            items.push((name("conv2.weight"), vec![b.cout, b.cout, 3, 3], ParamKind::Weight));
            self.norm_items(&mut items, &name("bn2"), b.cout);
            if b.has_shortcut_conv() {
                items.push((
                    name("shortcut.0.weight"),
                    vec![b.cout, b.cin, 1, 1],
                    ParamKind::Weight,
                ));
                self.norm_items(&mut items, &name("shortcut.1"), b.cout);
            }
        }
        let features = self.stages.last().map_or(self.stem, |s| s.0);
        Ok((items, features))
    }

    fn classifier_names(&self) -> (&'static str, &'static str) {
        ("fc.weight", "fc.bias")
    }

    fn embed<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        relu: &mut Relu,
        norms: &mut Norms,
    ) -> T2<Tp> {
        // Batch norm, the residual add and the ReLU after it run as one op where nothing needs
        // the ReLUs one by one (recorded or replayed patterns take the separate ops).
        let fuse = self.norm == Norm::Batch && relu.is_plain();
        if fuse && !Tp::OWNS_TAPE && matches!(norms, Norms::Running) {
            return self.embed_eval(p, x);
        }
        let mut at = Cursor { next: 0, state: p.len() - 3 * self.batch_norms() };
        let h = self.conv(x, p, &mut at, Conv2dCfg::new(self.stem, 3, 1), input_grad);
        let mut h = if fuse {
            let slot = self.take_bn(&mut at, norms);
            self.bn_relu(h, p, slot, norms, None::<T4<NoneTape>>)
        } else {
            relu.apply(self.norm(h, p, &mut at, norms))
        };
        for b in self.blocks() {
            // The block's input feeds both branches: the main one carries the tape, the
            // shortcut starts from a tape-free copy with the same id, so the join adds the
            // shortcut's gradient into the input's.
            let (hx, tape) = h.split_tape();
            let cfg = Conv2dCfg::new(b.cout, 3, 1).with_stride(b.stride);
            let m = self.conv(hx.clone().put_tape(tape), p, &mut at, cfg, true);
            let m = if fuse {
                let slot = self.take_bn(&mut at, norms);
                self.bn_relu(m, p, slot, norms, None::<T4<NoneTape>>)
            } else {
                relu.apply(self.norm(m, p, &mut at, norms))
            };
            let m = self.conv(m, p, &mut at, Conv2dCfg::new(b.cout, 3, 1), true);
            let sc_cfg = Conv2dCfg::new(b.cout, 1, 0).with_stride(b.stride);
            if fuse {
                // The second norm's parameters and statistics come before the shortcut's.
                let slot = self.take_bn(&mut at, norms);
                h = if b.has_shortcut_conv() {
                    let s = self.conv(hx.retaped::<Tp>(), p, &mut at, sc_cfg, true);
                    let s = self.norm(s, p, &mut at, norms);
                    self.bn_relu(m, p, slot, norms, Some(s))
                } else {
                    self.bn_relu(m, p, slot, norms, Some(hx))
                };
                continue;
            }
            let m = self.norm(m, p, &mut at, norms);
            let sum = if b.has_shortcut_conv() {
                let s = self.conv(hx.retaped::<Tp>(), p, &mut at, sc_cfg, true);
                m + self.norm(s, p, &mut at, norms)
            } else {
                m + hx
            };
            h = relu.apply(sum);
        }
        ops::global_avg_pool(h)
    }

    fn embed_macs(&self, input: ImageShape) -> u64 {
        let (mut h, mut w) = (input.height, input.width);
        let mut macs = (h * w * self.stem * input.channels * 9) as u64;
        for b in self.blocks() {
            h = (h - 1) / b.stride + 1;
            w = (w - 1) / b.stride + 1;
            let plane = (h * w * b.cout) as u64;
            macs += plane * (b.cin * 9 + b.cout * 9) as u64;
            if b.has_shortcut_conv() {
                macs += plane * b.cin as u64;
            }
        }
        macs
    }

    fn init(&self) -> Init {
        self.init
    }

    fn min_batch(&self, input: ImageShape) -> usize {
        let one = self.last_side(input.height) * self.last_side(input.width) == 1;
        if self.norm == Norm::Batch && one {
            2
        } else {
            1
        }
    }

    fn probe_chunk(&self) -> usize {
        128
    }

    /// One point at a time, as for the ConvNet: the ops parallelise over the batch.
    fn parallel_points(&self) -> bool {
        false
    }

    fn mlp_hidden(&self) -> Option<&[usize]> {
        None
    }

    /// Batch norm in evaluation mode (running statistics): the exact products of the Hessian's
    /// default `--bn-mode running`.
    fn hvp_net(&self, model: &super::Model) -> Option<crate::hvp::Net> {
        let blocks: Vec<_> = self.blocks().iter().map(|b| (b.cin, b.cout, b.stride)).collect();
        crate::hvp::resnet(model, self.stem, &blocks, self.norm)
    }
}
