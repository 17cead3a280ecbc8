//! Distillation settings: one serde struct whose JSON form (with the model and the source
//! dataset's provenance) is the output's identity.

use std::fmt;
use std::str::FromStr;

use lmc_train::data::ImageShape;
use lmc_train::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::dsa::Strategy;

/// The matching objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Distribution matching (Zhao & Bilen 2023): mean embeddings of freshly initialised networks.
    Dm,
    /// Gradient matching (DC, Zhao et al. 2021; IDC, Kim et al. 2022): parameter gradients of a
    /// network that is trained on real data meanwhile.
    Gm,
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s.trim().to_ascii_lowercase().as_str() {
            "dm" => Ok(Method::Dm),
            "gm" | "dc" | "idc" => Ok(Method::Gm),
            _ => Err(Error::setting(format!("--method '{s}': expected dm or gm"))),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Dm => "dm",
            Method::Gm => "gm",
        })
    }
}

/// Per-layer distance between real and synthetic gradients (gradient matching only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// IDC: sum of squared differences over the conv weights (all weights for a net without
    /// convolutions); biases, norm parameters and the classifier are not matched.
    Mse,
    /// DC: for every conv/linear weight, sum over output units of `1 - cos(g_real, g_syn)`
    /// (each unit's incoming weights as one vector); biases and norm parameters not matched.
    Cos,
}

impl FromStr for Distance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Distance> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mse" => Ok(Distance::Mse),
            "cos" | "cosine" => Ok(Distance::Cos),
            _ => Err(Error::setting(format!("--distance '{s}': expected mse (IDC) or cos (DC)"))),
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distance::Mse => "mse",
            Distance::Cos => "cos",
        })
    }
}

/// How gradient matching computes its mixed second derivative (the gradient of the matching
/// distance w.r.t. the synthetic pixels, `gm.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mixed {
    /// Exact for models without batch norm (MLPs, ConvNets); `fd` for models with batch norm,
    /// whose exact training-mode pass runs the whole batch as one group and costs more.
    Auto,
    /// Forward-over-reverse through the model (`lmc_train::hvp`): exact, and one pass.
    Exact,
    /// Central difference of two input gradients at parameters moved by `fd_eps` along the
    /// distance's gradient, ReLU patterns frozen (the DARTS construction).
    Fd,
}

impl FromStr for Mixed {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mixed> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mixed::Auto),
            "exact" => Ok(Mixed::Exact),
            "fd" => Ok(Mixed::Fd),
            _ => Err(Error::setting(format!("--mixed '{s}': expected auto, exact or fd"))),
        }
    }
}

/// How the synthetic images start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Random real images of each class (with factor f, each stored image's f x f cells are f^2
    /// real images shrunk by f).
    Real,
    /// Standard normal noise in normalised pixel space.
    Noise,
}

impl FromStr for Init {
    type Err = Error;
    fn from_str(s: &str) -> Result<Init> {
        match s.trim().to_ascii_lowercase().as_str() {
            "real" => Ok(Init::Real),
            "noise" => Ok(Init::Noise),
            _ => Err(Error::setting(format!("--init '{s}': expected real or noise"))),
        }
    }
}

/// Everything that decides what distillation produces (the model is named separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Matching objective.
    pub method: Method,
    /// Stored synthetic images per class.
    pub ipc: usize,
    /// Outer iterations: one update of the synthetic images per iteration for DM; one fresh
    /// network and `inner_loop` updates for GM.
    pub iterations: u64,
    /// IDC multi-formation factor (1 = plain images).
    pub factor: usize,
    /// DSA strategy (siamese: real and synthetic images of a class share the draw); flip is
    /// dropped for digit datasets.
    pub dsa: Strategy,
    /// Initialisation.
    pub init: Init,
    /// Learning rate of the synthetic pixels (SGD).
    pub lr_img: f64,
    /// Momentum of the synthetic pixels' SGD.
    pub momentum_img: f64,
    /// Real images per class per matching step.
    pub batch_real: usize,
    /// Seed of everything random (networks, real batches, augmentation, initialisation).
    pub seed: u64,
    /// Gradient distance (GM).
    pub distance: Distance,
    /// Synthetic-image updates per network (GM).
    pub inner_loop: usize,
    /// SGD steps of the network on real data after each inner update (GM).
    pub net_steps: usize,
    /// Batch size of those steps (GM).
    pub net_batch: usize,
    /// Learning rate of those steps (GM; momentum 0.9, weight decay 5e-4 as in IDC).
    pub net_lr: f64,
    /// How the mixed derivative is computed (GM).
    pub mixed: Mixed,
    /// Finite-difference step of the mixed derivative when it is taken by finite differences:
    /// the parameters move by `fd_eps` in norm (eps = fd_eps / ||u||) (GM).
    pub fd_eps: f64,
}

impl DistillConfig {
    /// The defaults of `method`: DM's lr_img 1 is its reference default; GM's lr_img is IDC's
    /// 0.005 for MSE and DC's 0.1 for cosine. The references draw 256 real images per class per
    /// step; the defaults here are 32 (DM) and 64 (GM), which costs far less per step on a CPU
    /// (see the README).
    pub fn defaults(method: Method, distance: Distance) -> DistillConfig {
        let lr_img = match (method, distance) {
            (Method::Dm, _) => 1.0,
            (Method::Gm, Distance::Mse) => 0.005,
            (Method::Gm, Distance::Cos) => 0.1,
        };
        DistillConfig {
            method,
            ipc: 10,
            iterations: 1000,
            factor: 1,
            dsa: crate::dsa::DEFAULT_STRATEGY.parse().expect("the default strategy parses"),
            init: Init::Real,
            lr_img,
            momentum_img: 0.5,
            batch_real: match method {
                Method::Dm => 32,
                Method::Gm => 64,
            },
            seed: 0,
            distance,
            inner_loop: 10,
            net_steps: 5,
            net_batch: 100,
            net_lr: 0.01,
            mixed: Mixed::Auto,
            fd_eps: 1e-3,
        }
    }

    /// Checks the settings against the data: image shape and the smallest class size.
    pub fn validate(&self, shape: ImageShape, smallest_class: (usize, &str)) -> Result<()> {
        let bad = |m: String| Err(Error::setting(m));
        if self.ipc == 0 {
            return bad("--ipc must be at least 1".into());
        }
        let (count, name) = smallest_class;
        if self.ipc > count {
            return bad(format!(
                "--ipc {}: class '{name}' has only {count} training images",
                self.ipc
            ));
        }
        if self.iterations == 0 {
            return bad("--iterations must be at least 1".into());
        }
        if self.factor == 0
            || !shape.height.is_multiple_of(self.factor)
            || !shape.width.is_multiple_of(self.factor)
        {
            return bad(format!(
                "--factor {} does not divide the {}x{} image size",
                self.factor, shape.height, shape.width
            ));
        }
        if self.factor > 1
            && self.init == Init::Real
            && self.ipc * self.factor * self.factor > count
        {
            return bad(format!(
                "--factor {} with --ipc {} initialises from {} real images per class, but class '{name}' has only {count}",
                self.factor,
                self.ipc,
                self.ipc * self.factor * self.factor
            ));
        }
        if !(self.lr_img.is_finite() && self.lr_img > 0.0) {
            return bad(format!("--lr-img {}: must be a positive number", self.lr_img));
        }
        if !(0.0..1.0).contains(&self.momentum_img) {
            return bad(format!("--momentum-img {}: must lie in [0, 1)", self.momentum_img));
        }
        if self.batch_real == 0 {
            return bad("--batch-real must be at least 1".into());
        }
        if self.method == Method::Gm {
            if self.inner_loop == 0 {
                return bad("--inner-loop must be at least 1".into());
            }
            if self.net_batch == 0 {
                return bad("--net-batch must be at least 1".into());
            }
            if !(self.net_lr.is_finite() && self.net_lr > 0.0) {
                return bad(format!("--net-lr {}: must be a positive number", self.net_lr));
            }
            if !(self.fd_eps.is_finite() && self.fd_eps > 0.0) {
                return bad(format!("--fd-eps {}: must be a positive number", self.fd_eps));
            }
        }
        Ok(())
    }

    /// Matching steps in the whole run (DM: iterations; GM: iterations x inner loop).
    pub fn total_steps(&self) -> u64 {
        match self.method {
            Method::Dm => self.iterations,
            Method::Gm => self.iterations * self.inner_loop as u64,
        }
    }
}
