//! The DC/DM ConvNet: `depth` blocks of conv3x3(`width`) -> norm -> ReLU -> avg-pool 2x2, with
//! the DC/DM names (`features.{index in the Sequential}`, then `classifier`).

use dfdx::prelude::*;

use super::{Architecture, Item, ModelSpec, Norm, Norms, Relu};
use crate::data::ImageShape;
use crate::ops::{self, Conv2dCfg, T1, T2, T4};
use crate::params::ParamKind;
use crate::{Error, Result};

pub(super) struct ConvNet {
    pub depth: usize,
    pub width: usize,
    pub norm: Norm,
}

impl Architecture for ConvNet {
    fn features(&self, spec: &ModelSpec, input: ImageShape) -> Result<(Vec<Item>, usize)> {
        let (depth, width) = (self.depth, self.width);
        let mut items = Vec::new();
        let per_block = if self.norm == Norm::None { 3 } else { 4 };
        let (mut c, mut h, mut wd) = (input.channels, input.height, input.width);
        for d in 0..depth {
            if h < 2 || wd < 2 {
                return Err(Error::incompatible(format!(
                    "model spec '{spec}': depth {depth} pools a {}x{} input below 1x1 at block {d}",
                    input.height, input.width
                )));
            }
            let i = d * per_block;
            items.push((format!("features.{i}.weight"), vec![width, c, 3, 3], ParamKind::Weight));
            items.push((format!("features.{i}.bias"), vec![width], ParamKind::Bias));
            if self.norm == Norm::Instance {
                items.push((
                    format!("features.{}.weight", i + 1),
                    vec![width],
                    ParamKind::NormScale,
                ));
                items.push((format!("features.{}.bias", i + 1), vec![width], ParamKind::NormShift));
            }
            c = width;
            h /= 2;
            wd /= 2;
        }
        Ok((items, c * h * wd))
    }

    fn classifier_names(&self) -> (&'static str, &'static str) {
        ("classifier.weight", "classifier.bias")
    }

    fn embed<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        relu: &mut Relu,
        _norms: &mut Norms,
    ) -> T2<Tp> {
        let mut h = x;
        let mut k = 0;
        for d in 0..self.depth {
            let cfg = Conv2dCfg { out_channels: self.width, kernel: 3, padding: 1, stride: 1 };
            h = ops::conv2d(h, &p[k], Some(&p[k + 1]), cfg, input_grad || d > 0);
            k += 2;
            let affine = (self.norm == Norm::Instance).then(|| (&p[k], &p[k + 1]));
            if affine.is_some() {
                k += 2;
            }
            h = if relu.is_plain() {
                // norm -> ReLU -> pool as one fused op (bit-identical to the three separate ops).
                ops::norm_relu_pool(h, affine, 1e-5, 2)
            } else {
                // A recorded or replayed ReLU sits between the separate ops.
                if let Some((g, b)) = affine {
                    h = ops::instance_norm(h, g, b, 1e-5);
                }
                ops::avg_pool2d(relu.apply(h), 2)
            };
        }
        ops::flatten(h)
    }

    fn embed_macs(&self, input: ImageShape) -> u64 {
        let (mut c, mut h, mut w) = (input.channels, input.height, input.width);
        let mut macs = 0u64;
        for _ in 0..self.depth {
            macs += (h * w * self.width * c * 9) as u64;
            c = self.width;
            h /= 2;
            w /= 2;
        }
        macs
    }

    fn probe_chunk(&self) -> usize {
        128
    }

    /// One point at a time: the ops parallelise well over the batch, and two concurrent
    /// 1000-image evaluations would double the activation memory (~0.5 GB per conv layer for
    /// ConvNet-3 on CIFAR-10).
    fn parallel_points(&self) -> bool {
        false
    }

    fn mlp_hidden(&self) -> Option<&[usize]> {
        None
    }

    fn hvp_net(&self, model: &super::Model) -> Option<crate::hvp::Net> {
        crate::hvp::convnet(model, self.depth, self.width, self.norm == Norm::Instance)
    }
}
