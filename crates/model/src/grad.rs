//! Global-norm gradient clipping (torch `clip_grad_norm_` / fairseq `clip_grad_norm_`), which
//! burn's per-tensor clipping does not provide.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
    seen: Vec<ParamId>,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.seen.contains(&param.id) {
            return;
        }
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register::<D>(param.id, g * self.factor);
            self.seen.push(param.id);
        }
    }
}

/// Total L2 norm of the gradients of `module`'s parameters found in `grads`.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm { grads, total: None };
    module.visit(&mut v);
    match v.total {
        None => 0.0,
        Some(t) => t.into_data().try_into_vec_as::<f64>().expect("f64 data")[0].sqrt(),
    }
}

/// Clip gradients by their global L2 norm: computes the norm over all parameters of `module`
/// and, if it exceeds `max_norm`, multiplies every gradient by `max_norm / (norm + 1e-6)`
/// (torch / fairseq rule: `min(1, max_norm / (norm + 1e-6))`). Returns the pre-clip norm.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = grad_norm(module, grads);
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        let mut v = Scale {
            grads,
            factor,
            seen: Vec::new(),
        };
        module.visit(&mut v);
    }
    norm
}

struct GradCollector<'a> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    out: std::collections::BTreeMap<String, Vec<f32>>,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let v = g
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 gradient");
            self.out.insert(self.path.join("."), v);
        }
    }
}

/// The gradients of `module`'s parameters found in `grads`, copied to the host by parameter name
/// (the dotted module path, e.g. `hubert.encoder.layers.0.attention.q_proj.weight`). Sorted by
/// name, so that sums over all gradients (the global norm) add in one fixed order: with a hash
/// map the norm's last bits changed from process to process, and with them clipped updates.
pub fn collect_grads<M: Module>(
    module: &M,
    grads: &GradientsParams,
) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut v = GradCollector {
        grads,
        path: Vec::new(),
        out: Default::default(),
    };
    module.visit(&mut v);
    v.out
}
