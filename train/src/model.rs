//! Architectures: [`ModelSpec`] (what the user writes on the command line) and [`Model`] (a spec
//! bound to an input shape and class count, with its parameter [`Layout`] and forward pass).

use std::fmt;
use std::str::FromStr;

use dfdx::prelude::*;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::ImageShape;
use crate::ops::{self, Conv2dCfg, T1, T2, T4};
use crate::params::{Layout, ParamKind, ParamVec};
use crate::seed::{self, Stream};
use crate::{Error, Result};

/// Normalisation layer of a ConvNet block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Norm {
    /// Instance norm with affine scale/shift: PyTorch `GroupNorm(C, C, affine=True)`, as in the
    /// DC/DM/IDC ConvNet.
    Instance,
    /// No normalisation.
    None,
}

/// An architecture, as written on the command line.
///
/// - `mlp:H1,H2,...` — fully connected ReLU network (`mlp:` with no sizes is softmax regression);
/// - `lenet-300-100` — Frankle & Carbin's LeNet (784-300-100-10 on MNIST);
/// - `convnet[:depth=D,width=W,norm=instance|none]` — D blocks of conv3x3(W) -> norm -> ReLU ->
///   avg-pool 2x2, then a linear classifier (defaults 3, 128, instance: the paper's ConvNet-3).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelSpec {
    /// Multi-layer perceptron with the given hidden widths.
    Mlp {
        /// Hidden layer widths, input side first.
        hidden: Vec<usize>,
    },
    /// LeNet-300-100 (an MLP with hidden widths 300 and 100).
    Lenet300100,
    /// The DC/DM ConvNet.
    ConvNet {
        /// Number of conv blocks.
        depth: usize,
        /// Channels of every conv.
        width: usize,
        /// Normalisation after each conv.
        norm: Norm,
    },
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Mlp { hidden } => {
                let h: Vec<String> = hidden.iter().map(|h| h.to_string()).collect();
                write!(f, "mlp:{}", h.join(","))
            }
            ModelSpec::Lenet300100 => write!(f, "lenet-300-100"),
            ModelSpec::ConvNet { depth, width, norm } => {
                let n = match norm {
                    Norm::Instance => "instance",
                    Norm::None => "none",
                };
                write!(f, "convnet:depth={depth},width={width},norm={n}")
            }
        }
    }
}

const SPEC_HELP: &str =
    "expected mlp:H1,H2,..., lenet-300-100 or convnet[:depth=D,width=W,norm=instance|none]";

impl FromStr for ModelSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |why: String| Error::invalid(format!("invalid model spec '{s}': {why} ({SPEC_HELP})"));
        let (head, args) = match s.split_once(':') {
            Some((h, a)) => (h.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        let positive = |v: &str, what: &str| -> Result<usize> {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(format!("{what} must be a positive integer, got '{v}'"))),
            }
        };
        match head.to_ascii_lowercase().as_str() {
            "mlp" => {
                let hidden = match args {
                    None | Some("") => vec![],
                    Some(a) => {
                        a.split(',').map(|h| positive(h, "hidden width")).collect::<Result<_>>()?
                    }
                };
                Ok(ModelSpec::Mlp { hidden })
            }
            "lenet-300-100" | "lenet300100" | "lenet" if args.is_none() => {
                Ok(ModelSpec::Lenet300100)
            }
            "convnet" => {
                let (mut depth, mut width, mut norm) = (3, 128, Norm::Instance);
                for kv in args.unwrap_or("").split(',').filter(|kv| !kv.trim().is_empty()) {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
                    match k.trim() {
                        "depth" => depth = positive(v, "depth")?,
                        "width" => width = positive(v, "width")?,
                        "norm" => {
                            norm = match v.trim() {
                                "instance" | "instancenorm" => Norm::Instance,
                                "none" => Norm::None,
                                other => return Err(bad(format!("unknown norm '{other}'"))),
                            }
                        }
                        other => return Err(bad(format!("unknown key '{other}'"))),
                    }
                }
                Ok(ModelSpec::ConvNet { depth, width, norm })
            }
            other => Err(bad(format!("unknown architecture '{other}'"))),
        }
    }
}

/// A spec bound to an input shape and class count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The architecture.
    pub spec: ModelSpec,
    /// Input image shape.
    pub input: ImageShape,
    /// Number of classes (output width).
    pub classes: usize,
    /// Parameter layout, in forward order.
    pub layout: Layout,
}

fn hidden_of(spec: &ModelSpec) -> Option<Vec<usize>> {
    match spec {
        ModelSpec::Mlp { hidden } => Some(hidden.clone()),
        ModelSpec::Lenet300100 => Some(vec![300, 100]),
        ModelSpec::ConvNet { .. } => None,
    }
}

impl Model {
    /// Binds `spec` to an input shape; fails when the input is too small for the architecture.
    pub fn new(spec: &ModelSpec, input: ImageShape, classes: usize) -> Result<Model> {
        if classes < 2 {
            return Err(Error::invalid(format!(
                "a classifier needs at least 2 classes, got {classes}"
            )));
        }
        let mut items = Vec::new();
        let w = |name: String, shape: Vec<usize>| (name, shape, ParamKind::Weight);
        if let Some(hidden) = hidden_of(spec) {
            // OpenLTH's mnist_lenet names: fc_layers.i then fc.
            let mut fan_in = input.len();
            for (i, &h) in hidden.iter().enumerate() {
                items.push(w(format!("fc_layers.{i}.weight"), vec![h, fan_in]));
                items.push((format!("fc_layers.{i}.bias"), vec![h], ParamKind::Bias));
                fan_in = h;
            }
            items.push(w("fc.weight".into(), vec![classes, fan_in]));
            items.push(("fc.bias".into(), vec![classes], ParamKind::Bias));
        } else if let ModelSpec::ConvNet { depth, width, norm } = spec {
            // DC/DM ConvNet names: features.{index in the Sequential}, then classifier.
            let per_block = if *norm == Norm::None { 3 } else { 4 };
            let (mut c, mut h, mut wd) = (input.channels, input.height, input.width);
            for d in 0..*depth {
                if h < 2 || wd < 2 {
                    return Err(Error::invalid(format!(
                        "model spec '{spec}': depth {depth} pools a {}x{} input below 1x1 at block {d}",
                        input.height, input.width
                    )));
                }
                let i = d * per_block;
                items.push(w(format!("features.{i}.weight"), vec![*width, c, 3, 3]));
                items.push((format!("features.{i}.bias"), vec![*width], ParamKind::Bias));
                if *norm == Norm::Instance {
                    items.push((
                        format!("features.{}.weight", i + 1),
                        vec![*width],
                        ParamKind::NormScale,
                    ));
                    items.push((
                        format!("features.{}.bias", i + 1),
                        vec![*width],
                        ParamKind::NormShift,
                    ));
                }
                c = *width;
                h /= 2;
                wd /= 2;
            }
            items.push(w("classifier.weight".into(), vec![classes, c * h * wd]));
            items.push(("classifier.bias".into(), vec![classes], ParamKind::Bias));
        }
        Ok(Model { spec: spec.clone(), input, classes, layout: Layout::new(items) })
    }

    /// Whether the architecture is a multilayer perceptron (no convolutions).
    pub fn is_mlp(&self) -> bool {
        hidden_of(&self.spec).is_some()
    }

    /// For an MLP, its layer widths: input features, each hidden width, classes.
    pub fn mlp_widths(&self) -> Option<Vec<usize>> {
        let hidden = hidden_of(&self.spec)?;
        Some(std::iter::once(self.input.len()).chain(hidden).chain([self.classes]).collect())
    }

    /// PyTorch's default initialisation, drawn from `seed`: conv/linear weights and biases
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), norm scale 1, shift 0.
    pub fn init(&self, seed: u64) -> ParamVec {
        let mut rng = seed::rng(seed, Stream::Init, 0);
        let mut p = ParamVec::zeros(self.layout.clone());
        let mut fan_in = 1usize;
        for e in &self.layout.entries {
            let r = e.range();
            match e.kind {
                ParamKind::Weight => {
                    fan_in = e.shape[1..].iter().product();
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    p.data[r].iter_mut().for_each(|v| *v = rng.gen_range(-bound..bound));
                }
                ParamKind::Bias => {
                    // The bias follows its weight, so fan_in is that weight's.
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    p.data[r].iter_mut().for_each(|v| *v = rng.gen_range(-bound..bound));
                }
                ParamKind::NormScale => p.data[r].iter_mut().for_each(|v| *v = 1.0),
                ParamKind::NormShift => {}
            }
        }
        p
    }

    /// One tape-free tensor per layout entry, copied from `params`.
    pub fn tensors(&self, dev: &Cpu, params: &ParamVec) -> Vec<T1> {
        self.layout
            .entries
            .iter()
            .map(|e| dev.tensor_from_vec(params.data[e.range()].to_vec(), (e.len(),)))
            .collect()
    }

    /// Forward pass: images (N, C, H, W) to logits (N, classes). `input_grad` asks the first layer
    /// to propagate gradients to the images (distillation needs it; training does not).
    pub fn forward<Tp: Tape<f32, Cpu>>(&self, p: &[T1], x: T4<Tp>, input_grad: bool) -> T2<Tp> {
        let k = p.len() - 2;
        // The classifier is the first layer only for an MLP without hidden layers.
        let classifier_first = hidden_of(&self.spec).is_some_and(|h| h.is_empty());
        ops::linear(
            self.embed(p, x, input_grad),
            &p[k],
            &p[k + 1],
            self.classes,
            input_grad || !classifier_first,
        )
    }

    /// Features before the classifier (N, F): what distribution matching embeds. Takes the full
    /// parameter list and ignores the classifier's two tensors.
    pub fn embed<Tp: Tape<f32, Cpu>>(&self, p: &[T1], x: T4<Tp>, input_grad: bool) -> T2<Tp> {
        if let Some(hidden) = hidden_of(&self.spec) {
            let mut h = ops::flatten(x);
            for (i, &width) in hidden.iter().enumerate() {
                h = ops::relu2(ops::linear(
                    h,
                    &p[2 * i],
                    &p[2 * i + 1],
                    width,
                    input_grad || i > 0,
                ));
            }
            return h;
        }
        let ModelSpec::ConvNet { depth, width, norm } = &self.spec else { unreachable!() };
        let mut h = x;
        let mut k = 0;
        for d in 0..*depth {
            let cfg = Conv2dCfg { out_channels: *width, kernel: 3, padding: 1 };
            h = ops::conv2d(h, &p[k], Some(&p[k + 1]), cfg, input_grad || d > 0);
            k += 2;
            // norm -> ReLU -> pool as one fused op (bit-identical to the three separate ops).
            let affine = (*norm == Norm::Instance).then(|| (&p[k], &p[k + 1]));
            h = ops::norm_relu_pool(h, affine, 1e-5, 2);
            if affine.is_some() {
                k += 2;
            }
        }
        ops::flatten(h)
    }

    /// Multiply-accumulates of one forward pass for one image (for GFLOP/s reporting).
    pub fn forward_macs(&self) -> u64 {
        let mut macs = 0u64;
        if let ModelSpec::ConvNet { depth, width, .. } = &self.spec {
            let (mut c, mut h, mut w) = (self.input.channels, self.input.height, self.input.width);
            for _ in 0..*depth {
                macs += (h * w * width * c * 9) as u64;
                c = *width;
                h /= 2;
                w /= 2;
            }
            return macs + (c * h * w * self.classes) as u64;
        }
        self.layout
            .entries
            .iter()
            .filter(|e| e.kind == ParamKind::Weight)
            .map(|e| e.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(c: usize, h: usize) -> ImageShape {
        ImageShape { channels: c, height: h, width: h }
    }

    #[test]
    fn specs_parse_and_round_trip() {
        for s in [
            "mlp:32,16",
            "mlp:",
            "lenet-300-100",
            "convnet:depth=3,width=128,norm=instance",
            "convnet:depth=2,width=8,norm=none",
        ] {
            let spec: ModelSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        let d: ModelSpec = "convnet".parse().unwrap();
        assert_eq!(d, ModelSpec::ConvNet { depth: 3, width: 128, norm: Norm::Instance });
        for bad in [
            "resnet",
            "mlp:0",
            "mlp:a",
            "convnet:depth=0",
            "convnet:norm=batchy",
            "convnet:foo=1",
            "lenet-300-100:3",
        ] {
            let e = bad.parse::<ModelSpec>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn lenet_has_266k_parameters() {
        // 784*300+300 + 300*100+100 + 100*10+10 = 266,610 (Frankle & Carbin's count).
        let m = Model::new(&ModelSpec::Lenet300100, shape(1, 28), 10).unwrap();
        assert_eq!(m.layout.total(), 266_610);
        assert_eq!(m.layout.prunable_total(), 266_200);
    }

    #[test]
    fn convnet3_cifar_parameter_count_matches_pytorch() {
        // conv1 128*3*9+128, conv2/3 128*128*9+128 each, 3 norms 2*128 each, linear 2048*10+10
        // = 3584 + 2*147584 + 768 + 20490 = 320,010.
        let m = Model::new(&"convnet".parse().unwrap(), shape(3, 32), 10).unwrap();
        assert_eq!(m.layout.total(), 320_010);
        assert_eq!(m.layout.entries.last().unwrap().name, "classifier.bias");
        assert_eq!(m.layout.get("classifier.weight").unwrap().shape, vec![10, 2048]);
        // MNIST: 28 -> 14 -> 7 -> 3, so the classifier sees 128*3*3 = 1152 features.
        let m = Model::new(&"convnet".parse().unwrap(), shape(1, 28), 10).unwrap();
        assert_eq!(m.layout.get("classifier.weight").unwrap().shape, vec![10, 1152]);
        assert!(Model::new(&"convnet:depth=4".parse().unwrap(), shape(1, 8), 10).is_err());
    }

    #[test]
    fn init_follows_pytorch_bounds_and_is_seeded() {
        let m = Model::new(&"mlp:20".parse().unwrap(), shape(1, 8), 10).unwrap();
        let a = m.init(7);
        assert_eq!(a, m.init(7));
        assert_ne!(a.data, m.init(8).data);
        let w = a.get("fc_layers.0.weight").unwrap();
        let bound = 1.0 / 64f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        // Uniform on [-b, b] has standard deviation b/sqrt(3); 1280 draws land within 10%.
        let sd = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((sd / (bound as f64 / 3f64.sqrt()) - 1.0).abs() < 0.1, "{sd}");
        let b2 = a.get("fc.bias").unwrap();
        assert!(b2.iter().all(|v| v.abs() <= 1.0 / 20f32.sqrt()));
    }
}
