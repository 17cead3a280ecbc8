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

use std::sync::Mutex;

use dfdx::prelude::*;

use super::{Architecture, Init, Item, ModelSpec, Norm, Norms, Relu};
use crate::data::ImageShape;
use crate::ops::batch_norm::{self, Mask, ResGrad, TrainSaved};
use crate::ops::direct::AffineRelu;
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

impl Cursor {
    /// Takes the next batch norm's slot (as [`ResNet::norm`] would use it).
    fn take_bn(&mut self) -> BnSlot {
        let slot = BnSlot { param: self.next, state: self.state };
        self.next += 2;
        self.state += 3;
        slot
    }
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
            // As in `norm` and `bn_relu_eval`: running statistics are checked when a vector is read.
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
        norm(&mut h, at.take_bn(), true, None);
        for b in self.blocks() {
            let cfg = Conv2dCfg::new(b.cout, 3, 1).with_stride(b.stride);
            let mut m = conv(&h, &mut at, cfg);
            norm(&mut m, at.take_bn(), true, None);
            let mut m = conv(&m, &mut at, Conv2dCfg::new(b.cout, 3, 1));
            // The second norm's parameters and statistics come before the shortcut's.
            let slot = at.take_bn();
            if b.has_shortcut_conv() {
                let sc_cfg = Conv2dCfg::new(b.cout, 1, 0).with_stride(b.stride);
                let mut s = conv(&h, &mut at, sc_cfg);
                norm(&mut s, at.take_bn(), false, None);
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

/// A convolution of the training path: its weight's index and values, geometry and output
/// channels (its input is an activation the path keeps anyway), and what its forward pass kept
/// for the backward.
struct ConvRec {
    w: usize,
    wv: Vec<f32>,
    g: ops::ConvGeom,
    cout: usize,
    saved: Option<ops::ConvSaved>,
}

/// A batch norm of the training path: its slot, its input (kept for the backward pass), and what
/// its backward needs.
struct BnRec {
    slot: BnSlot,
    x: Vec<f32>,
    saved: TrainSaved,
}

/// One basic block of the training path. Its input is the previous activation; `r1` is the
/// first norm's output (the second conv's input and, being a ReLU's output, its mask), or
/// `None` where the second conv forms it from the norm's input itself (`direct::AffineRelu`).
struct BlockRec {
    conv1: ConvRec,
    bn1: BnRec,
    r1: Option<Vec<f32>>,
    conv2: ConvRec,
    bn2: BnRec,
    shortcut: Option<(ConvRec, BnRec)>,
}

/// A convolution's input: the values, or the values a map forms it from.
type Input<'a> = (&'a [f32], Option<AffineRelu<'a>>);

impl BlockRec {
    /// The second conv's input: the first norm's output, or its input with the map to it.
    fn conv2_input(&self) -> Input<'_> {
        match &self.r1 {
            Some(r1) => (r1, None),
            None => (&self.bn1.x, Some(self.bn1.map())),
        }
    }

    /// Where the first norm's ReLU was active.
    fn mask1(&self) -> Mask<'_> {
        match &self.r1 {
            Some(r1) => Mask::Positive(r1),
            None => {
                let AffineRelu { scale, shift } = self.bn1.map();
                let (_, _, h, w) = self.bn1.saved.shape;
                Mask::Affine { x: &self.bn1.x, scale, shift, p: h * w }
            }
        }
    }
}

impl BnRec {
    /// The norm's output (with a ReLU) as a map of its input.
    fn map(&self) -> AffineRelu<'_> {
        AffineRelu { scale: &self.saved.scale, shift: &self.saved.shift }
    }
}

impl ResNet {
    /// [`Architecture::embed`] in training mode (batch statistics, plain ReLUs) as one op on the
    /// tape, its activations in plain buffers: each op's input is kept once (the ResNet's ReLU
    /// outputs double as the ReLUs' masks) instead of being copied out of a dfdx tensor by every
    /// op that reads it, and no gradient of an intermediate activation lives in dfdx's store.
    /// Forward and backward call the same slice-level code as the separate ops
    /// (`ops::conv2d_slices` / `conv2d_backward_slices`, `batch_norm::train_forward` /
    /// `train_backward`) and the backward visits the layers, and adds into each input's gradient,
    /// in the order dfdx's tape runs the separate ops (the reverse of their recording: in a
    /// block the second norm with its residual, the shortcut's norm and conv, the second conv,
    /// the first norm, the first conv), so the bits are the separate ops' (a test compares them).
    fn embed_train<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        norms: &mut Norms,
    ) -> T2<Tp> {
        let build = crate::cpu::Build::selected();
        let (x, mut tape) = x.contiguous().split_tape();
        let dev = x.device().clone();
        let shape0 = *x.shape();
        let n = shape0.0;
        let xv = ops::read(&x);
        let mut at = Cursor { next: 0, state: p.len() - 3 * self.batch_norms() };
        let mut stats = Vec::new();
        let conv =
            |h: &[f32], map: Option<AffineRelu<'_>>, shape, at: &mut Cursor, cfg: Conv2dCfg| {
                let w = at.next;
                at.next += 1;
                let g = ops::conv2d_geometry(shape, &p[w], None, cfg);
                let wv = ops::read(&p[w]);
                let save = Tp::OWNS_TAPE;
                let cout = cfg.out_channels;
                // Every conv here feeds a batch norm: where the conv runs sample by sample, the
                // norm's per-plane statistics are summed as each sample's output is written
                // (in cache) rather than in a pass of their own over the whole output.
                let planes = ops::conv2d_runs_epilogue(build, &g, cout)
                    .then(|| Mutex::new(vec![(0.0f64, 0.0f64); n * cout]));
                let epilogue = |ni: usize, yn: &[f32]| {
                    let mut v = vec![(0.0f64, 0.0f64); cout];
                    // In the build's code: the conv calls this through a `dyn` pointer, so
                    // nothing of the conv's build reaches it.
                    build.run(
                        #[inline(always)]
                        || batch_norm::plane_stats_of(build, yn, g.pd(), &mut v),
                    );
                    let mut ps = planes.as_ref().expect("planes").lock().expect("not poisoned");
                    ps[ni * cout..(ni + 1) * cout].copy_from_slice(&v);
                };
                let e = planes.is_some().then_some(&epilogue as ops::ConvEpilogue<'_>);
                let (y, saved) =
                    ops::conv2d_slices_saving(build, &g, n, cout, h, &wv, None, save, map, e);
                let planes = planes.map(|m| m.into_inner().expect("not poisoned"));
                let shape = (n, cfg.out_channels, g.ho, g.wo);
                (y, shape, ConvRec { w, wv, g, cout: cfg.out_channels, saved }, planes)
            };
        let bn = |stats: &mut Vec<_>,
                  (x, shape, planes): (Vec<f32>, _, _),
                  slot: BnSlot,
                  relu,
                  res: Option<&[f32]>| {
            let (gamma, beta) = (&p[slot.param], &p[slot.param + 1]);
            let (y, _, st, saved) = batch_norm::train_forward(
                build, &x, shape, gamma, beta, BN_EPS, relu, res, false, planes,
            )
            .expect("batch norm in training mode: batch size checked by check_train_batch");
            stats.push(st);
            (y, BnRec { slot, x, saved })
        };
        let (c0, shape, stem, ps) =
            conv(&xv, None, shape0, &mut at, Conv2dCfg::new(self.stem, 3, 1));
        let (a0, bn0) = bn(&mut stats, (c0, shape, ps), at.take_bn(), true, None);
        let mut acts = vec![a0];
        let mut shapes = vec![shape];
        let mut blocks = Vec::new();
        for b in self.blocks() {
            let (h, hs) = (acts.last().expect("the stem's output"), *shapes.last().unwrap());
            let cfg = Conv2dCfg::new(b.cout, 3, 1).with_stride(b.stride);
            let (m1, s1, conv1, ps1) = conv(h, None, hs, &mut at, cfg);
            let cfg2 = Conv2dCfg::new(b.cout, 3, 1);
            let g2 = ops::ConvGeom::new(s1.1, s1.2, s1.3, cfg2).expect("a 3x3 same conv fits");
            // Where the second conv runs the direct kernels, it forms its input from the first
            // norm's (see `direct::AffineRelu`): the norm's output pass, a full-size write and
            // read, is skipped, and the output is not kept.
            let (r1, bn1) = if ops::conv2d_takes_mapped_input(build, &g2, b.cout) {
                let slot = at.take_bn();
                let (gamma, beta) = (&p[slot.param], &p[slot.param + 1]);
                let (st, saved) = batch_norm::train_stats(build, &m1, s1, gamma, beta, BN_EPS, ps1)
                    .expect("batch norm in training mode: batch size checked by check_train_batch");
                stats.push(st);
                (None, BnRec { slot, x: m1, saved })
            } else {
                let (r1, bn1) = bn(&mut stats, (m1, s1, ps1), at.take_bn(), true, None);
                (Some(r1), bn1)
            };
            let (m2, s2, conv2, ps2) = match &r1 {
                Some(r1) => conv(r1, None, s1, &mut at, cfg2),
                None => conv(&bn1.x, Some(bn1.map()), s1, &mut at, cfg2),
            };
            // The second norm's parameters and statistics come before the shortcut's, but it
            // runs after the shortcut (it adds the shortcut's output); its statistics are put
            // back in layout order below.
            let slot2 = at.take_bn();
            let (out, bn2, shortcut) = if b.has_shortcut_conv() {
                let sc_cfg = Conv2dCfg::new(b.cout, 1, 0).with_stride(b.stride);
                let (s, ss, sc, pss) = conv(h, None, hs, &mut at, sc_cfg);
                let (sn, sbn) = bn(&mut stats, (s, ss, pss), at.take_bn(), false, None);
                let (out, bn2) = bn(&mut stats, (m2, s2, ps2), slot2, true, Some(&sn));
                let k = stats.len();
                stats.swap(k - 2, k - 1);
                (out, bn2, Some((sc, sbn)))
            } else {
                let (out, bn2) = bn(&mut stats, (m2, s2, ps2), slot2, true, Some(h));
                (out, bn2, None)
            };
            blocks.push(BlockRec { conv1, bn1, r1, conv2, bn2, shortcut });
            acts.push(out);
            shapes.push(s2);
        }
        if let Norms::Collect(v) = norms {
            v.extend(stats);
        }
        let last = acts.last().expect("the stem's output");
        let out = dev.tensor_from_vec(last.clone(), *shapes.last().unwrap());
        if Tp::OWNS_TAPE {
            let (x_g, out_g) = (x.ghost(), out.ghost());
            let ghosts: Vec<_> = p.iter().map(|t| t.ghost()).collect();
            tape.add_backward_op(move |grads| {
                // A conv's backward: the input gradient into `dx` (when given), the weight's
                // into its gradient.
                let conv_back = |grads: &mut Gradients<f32, Cpu>,
                                 c: &ConvRec,
                                 (input, map): Input<'_>,
                                 dy: &[f32],
                                 dx: Option<ops::ConvDx<'_>>| {
                    let (g, s) = (&c.g, c.saved.as_ref());
                    let (dw, _) = ops::conv2d_backward_slices(
                        build, g, n, c.cout, input, map, &c.wv, false, dy, dx, s,
                    );
                    let dst = grads.get_or_alloc_mut(&ghosts[c.w])?;
                    ops::conv2d_add_weight_grad(dst, &dw, c.g.kd(), c.cout);
                    Ok::<(), <Cpu as HasErr>::Err>(())
                };
                // A conv's backward into a new buffer for its input gradient, written rather
                // than added into zeros (`ConvDx::Write`: no zeroing pass over it first).
                let conv_back_new =
                    |grads: &mut Gradients<f32, Cpu>, c: &ConvRec, input: Input<'_>, dy: &[f32]| {
                        let len = input.0.len();
                        let mut dx = Vec::with_capacity(len);
                        let spare = &mut dx.spare_capacity_mut()[..len];
                        conv_back(grads, c, input, dy, Some(ops::ConvDx::Write(spare)))?;
                        // SAFETY: a `Write` input gradient writes every element.
                        unsafe { dx.set_len(len) };
                        Ok::<Vec<f32>, <Cpu as HasErr>::Err>(dx)
                    };
                // A norm's backward: `dy` through its tail (`mask`, the residual's part into
                // `dr`), then its input's gradient written over `dy`, gamma's and beta's added
                // into theirs.
                let norm_back = |grads: &mut Gradients<f32, Cpu>,
                                 r: &BnRec,
                                 dy: &mut [f32],
                                 mask: Mask<'_>,
                                 dr: Option<ResGrad<'_>>| {
                    let tot = batch_norm::train_backward(build, &r.saved, &r.x, dy, mask, dr, None);
                    let (g, b) = (&ghosts[r.slot.param], &ghosts[r.slot.param + 1]);
                    ops::add_channel_totals(grads.get_or_alloc_mut(g)?, tot.iter().map(|t| t.0));
                    ops::add_channel_totals(grads.get_or_alloc_mut(b)?, tot.iter().map(|t| t.1));
                    Ok::<(), <Cpu as HasErr>::Err>(())
                };
                // The residual's gradient is the first thing a block's input gradient (or its
                // shortcut norm's) receives: written, as `0.0 + g`, into a buffer not zeroed
                // first (`ResGrad::Write`: the bits of adding it into zeros).
                let residual_grad =
                    |grads: &mut Gradients<f32, Cpu>, r: &BnRec, dy: &mut [f32], mask: Mask<'_>| {
                        let mut g: Vec<f32> = Vec::with_capacity(dy.len());
                        let spare = &mut g.spare_capacity_mut()[..dy.len()];
                        norm_back(grads, r, dy, mask, Some(ResGrad::Write(spare)))?;
                        // SAFETY: `ResGrad::Write` wrote every element (`train_backward`).
                        unsafe { g.set_len(dy.len()) };
                        Ok::<Vec<f32>, <Cpu as HasErr>::Err>(g)
                    };
                // Each norm's input gradient is written over its output's (`dx = None`).
                let mut d = std::mem::take(&mut **grads.get_or_alloc_mut(&out_g)?);
                for (bi, blk) in blocks.iter().enumerate().rev() {
                    let (input, out) = (&acts[bi], &acts[bi + 1]);
                    let pos = Mask::Positive(out);
                    let mut d_in = match &blk.shortcut {
                        Some((sc, sbn)) => {
                            let mut ds = residual_grad(grads, &blk.bn2, &mut d, pos)?;
                            norm_back(grads, sbn, &mut ds, Mask::None, None)?;
                            conv_back_new(grads, sc, (input, None), &ds)?
                        }
                        None => residual_grad(grads, &blk.bn2, &mut d, pos)?,
                    };
                    let mut dr1 = conv_back_new(grads, &blk.conv2, blk.conv2_input(), &d)?;
                    drop(d);
                    norm_back(grads, &blk.bn1, &mut dr1, blk.mask1(), None)?;
                    let d_add = Some(ops::ConvDx::Add(&mut d_in));
                    conv_back(grads, &blk.conv1, (input, None), &dr1, d_add)?;
                    d = d_in;
                }
                norm_back(grads, &bn0, &mut d, Mask::Positive(&acts[0]), None)?;
                // As the separate conv: the input's gradient exists (zeros) even when skipped.
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                let mut dx = std::mem::take(dx);
                let dxs = input_grad.then_some(ops::ConvDx::Add(dx.as_mut_slice()));
                conv_back(grads, &stem, (&xv, None), &d, dxs)?;
                **grads.get_or_alloc_mut(&x_g)? = dx;
                Ok(())
            });
        }
        ops::global_avg_pool(out.put_tape(tape))
    }
}

/// A batch norm's place: its gamma's index and its running statistics' index.
struct BnSlot {
    param: usize,
    state: usize,
}

impl ResNet {
    /// `relu(norm(h) + residual)` for batch norm with running statistics as one op
    /// (bit-identical to `norm`, `+` and the ReLU separately, see `ops::batch_norm_relu_eval`).
    /// `embed` reaches it only in evaluation mode on a tape (the Hessian's default): batch
    /// statistics with plain ReLUs go through `embed_train`.
    fn bn_relu_eval<Tp, R>(
        &self,
        h: T4<Tp>,
        p: &[T1],
        slot: BnSlot,
        residual: Option<T4<R>>,
    ) -> T4<Tp>
    where
        Tp: Tape<f32, Cpu> + Merge<R>,
        R: Tape<f32, Cpu>,
    {
        let (gamma, beta, st) = (&p[slot.param], &p[slot.param + 1], slot.state);
        let running =
            RunningStats { mean: p[st].as_vec(), var: p[st + 1].as_vec(), num_batches_tracked: 0 };
        // As in `norm`: running statistics are checked when a vector is read, and the residual
        // has the block's output shape.
        ops::batch_norm_relu_eval(h, gamma, beta, &running, BN_EPS, residual)
            .expect("batch norm in evaluation mode: running statistics checked on load")
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
        if fuse && !matches!(norms, Norms::Running) {
            return self.embed_train(p, x, input_grad, norms);
        }
        // Fused from here on means running statistics (evaluation mode on a tape).
        let mut at = Cursor { next: 0, state: p.len() - 3 * self.batch_norms() };
        let h = self.conv(x, p, &mut at, Conv2dCfg::new(self.stem, 3, 1), input_grad);
        let mut h = if fuse {
            let slot = at.take_bn();
            self.bn_relu_eval(h, p, slot, None::<T4<NoneTape>>)
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
                let slot = at.take_bn();
                self.bn_relu_eval(m, p, slot, None::<T4<NoneTape>>)
            } else {
                relu.apply(self.norm(m, p, &mut at, norms))
            };
            let m = self.conv(m, p, &mut at, Conv2dCfg::new(b.cout, 3, 1), true);
            let sc_cfg = Conv2dCfg::new(b.cout, 1, 0).with_stride(b.stride);
            if fuse {
                // The second norm's parameters and statistics come before the shortcut's.
                let slot = at.take_bn();
                h = if b.has_shortcut_conv() {
                    let s = self.conv(hx.retaped::<Tp>(), p, &mut at, sc_cfg, true);
                    let s = self.norm(s, p, &mut at, norms);
                    self.bn_relu_eval(m, p, slot, Some(s))
                } else {
                    self.bn_relu_eval(m, p, slot, Some(hx))
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
