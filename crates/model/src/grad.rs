//! Gradients by parameter name: the host copy the trainers' core (`fedhubert_train::core`)
//! clips and feeds to AdamW.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

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
