//! Fully connected ReLU networks: `mlp:H1,H2,...` and LeNet-300-100, with OpenLTH's
//! `mnist_lenet` names (`fc_layers.i`, then `fc`).

use dfdx::prelude::*;

use super::{Architecture, Item, ModelSpec, Norms, Relu};
use crate::data::ImageShape;
use crate::ops::{self, T1, T2, T4};
use crate::params::ParamKind;
use crate::Result;

/// LeNet-300-100's hidden widths (Frankle & Carbin).
pub(super) const LENET_300_100: [usize; 2] = [300, 100];

/// An MLP with these hidden widths (none: softmax regression).
pub(super) struct Mlp<'s> {
    pub hidden: &'s [usize],
}

impl Architecture for Mlp<'_> {
    fn features(&self, _spec: &ModelSpec, input: ImageShape) -> Result<(Vec<Item>, usize)> {
        let mut items = Vec::new();
        let mut fan_in = input.len();
        for (i, &h) in self.hidden.iter().enumerate() {
            items.push((format!("fc_layers.{i}.weight"), vec![h, fan_in], ParamKind::Weight));
            items.push((format!("fc_layers.{i}.bias"), vec![h], ParamKind::Bias));
            fan_in = h;
        }
        Ok((items, fan_in))
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
        _norms: &mut Norms,
    ) -> T2<Tp> {
        let mut h = ops::flatten(x);
        for (i, &width) in self.hidden.iter().enumerate() {
            h = relu.apply(ops::linear(h, &p[2 * i], &p[2 * i + 1], width, input_grad || i > 0));
        }
        h
    }

    fn embed_macs(&self, input: ImageShape) -> u64 {
        let mut fan_in = input.len();
        let mut macs = 0u64;
        for &h in self.hidden {
            macs += (fan_in * h) as u64;
            fan_in = h;
        }
        macs
    }

    fn probe_chunk(&self) -> usize {
        2048
    }

    /// Measured (2026-11-27, 2-core AMD EPYC VM, AVX2 without AVX-512) with LeNet-300-100 on
    /// 10,000 MNIST images, the two are equal within noise (the GEMMs already use both cores), and for small
    /// MLPs points win (their GEMMs are too small to split).
    fn parallel_points(&self) -> bool {
        true
    }

    fn mlp_hidden(&self) -> Option<&[usize]> {
        Some(self.hidden)
    }

    fn hvp_net(&self, model: &super::Model) -> Option<crate::hvp::Net> {
        crate::hvp::mlp(model)
    }
}
