//! Autodiff gradients of the masked-prediction loss against central finite differences, in
//! f64 (this test binary configures the flex device to f64 before creating any tensor).
//!
//! Bound: |autodiff - fd| <= 1e-5 * max(|fd|, |autodiff|) + 1e-9, with eps = 1e-6. In f64 the
//! truncation error of central differences is O(eps^2 * f''') ~ 1e-12 and the rounding error
//! ~ 1e-16 / eps ~ 1e-10, so 1e-5 leaves a wide margin while still catching any wrong term.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use fedhubert_model::{
    HubertConfig, HubertForPretraining, PretrainBatch, PretrainConfig, cpu_device,
};

struct Perturb {
    path: Vec<String>,
    target: String,
    index: usize,
    delta: f64,
}

impl ModuleMapper for Perturb {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.path.join(".") != self.target {
            return param;
        }
        let (index, delta) = (self.index, self.delta);
        param.map(move |t| {
            let device = t.device();
            let shape = t.dims();
            let mut v = t.into_data().try_into_vec_as::<f64>().unwrap();
            v[index] += delta;
            Tensor::from_data(TensorData::new(v, shape), &device)
        })
    }
}

struct GradOf<'a> {
    path: Vec<String>,
    target: String,
    grads: &'a burn::tensor::Gradients,
    out: Option<Vec<f64>>,
}

impl ModuleVisitor for GradOf<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.path.join(".") == self.target {
            self.out = param
                .val()
                .grad(self.grads)
                .map(|g| g.into_data().try_into_vec_as::<f64>().unwrap());
        }
    }
}

fn f64_device() -> Device {
    let mut device = cpu_device();
    device
        .configure(FloatDType::F64)
        .expect("flex supports f64 and nothing was created yet");
    device
}

fn setup(device: &Device) -> (HubertForPretraining, PretrainBatch, Vec<Vec<bool>>) {
    let cfg = HubertConfig {
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        conv_dim: vec![8, 8],
        conv_kernel: vec![10, 3],
        conv_stride: vec![5, 2],
        num_feat_extract_layers: 2,
        num_conv_pos_embeddings: 4,
        num_conv_pos_embedding_groups: 2,
        ..HubertConfig::tiny()
    };
    let pcfg = PretrainConfig {
        num_classes: 5,
        final_dim: 6,
        label_rate: 1600.0, // ratio 1 with a total stride of 10
        feature_grad_mult: 1.0,
        pred_nomask_weight: 0.5,
        ..Default::default()
    };
    let model = HubertForPretraining::new(&cfg, &pcfg, 17, device).unwrap();
    let b = 2;
    let samples = 200; // 19 frames
    let wav: Vec<f64> = (0..b * samples)
        .map(|i| ((i as f64) * 0.37).sin() * 0.8)
        .collect();
    let batch = PretrainBatch {
        waveform: Tensor::from_data(TensorData::new(wav, [b, samples]), device),
        sample_lengths: Some(vec![200, 150]),
        labels: vec![
            (0..19).map(|t| (t % 5) as u32).collect(),
            (0..19).map(|t| ((t / 3) % 5) as u32).collect(),
        ],
    };
    let mask = (0..b)
        .map(|i| (0..19).map(|t| (t + i) % 3 == 0).collect())
        .collect();
    (model, batch, mask)
}

fn loss(model: &HubertForPretraining, batch: &PretrainBatch, mask: &[Vec<bool>]) -> Tensor<1> {
    model
        .forward_pretrain_with(batch, |_, _, _| mask.to_vec())
        .unwrap()
        .loss
}

#[test]
fn masked_prediction_gradients_match_finite_differences() {
    let plain = f64_device();
    let ad = plain.clone().autodiff();
    let (model, batch, mask) = setup(&ad);

    let l = loss(&model, &batch, &mask);
    let grads = l.backward();

    let checks = [
        ("hubert.feature_extractor.conv_layers.0.conv.weight", 3),
        ("hubert.feature_extractor.conv_layers.1.conv.weight", 40),
        ("hubert.encoder.layers.0.attention.q_proj.weight", 5),
        ("hubert.encoder.layers.0.attention.v_proj.bias", 1),
        ("hubert.encoder.layers.0.attention.out_proj.weight", 20),
        ("hubert.encoder.layers.0.layer_norm.weight", 2),
        (
            "hubert.encoder.layers.0.feed_forward.intermediate_dense.weight",
            9,
        ),
        (
            "hubert.encoder.pos_conv_embed.conv.parametrizations.weight.original0",
            1,
        ),
        (
            "hubert.encoder.pos_conv_embed.conv.parametrizations.weight.original1",
            11,
        ),
        ("hubert.masked_spec_embed", 4),
        ("final_proj.weight", 7),
        ("label_embs_concat", 7),
    ];
    let eps = 1e-6;
    let valid = model.valid();
    let plain_batch = PretrainBatch {
        waveform: batch.waveform.clone().to_device(&plain),
        ..batch.clone()
    };
    let scalar = |m: &HubertForPretraining| {
        loss(m, &plain_batch, &mask)
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap()[0]
    };
    for (path, index) in checks {
        let mut v = GradOf {
            path: vec![],
            target: path.into(),
            grads: &grads,
            out: None,
        };
        model.visit(&mut v);
        let analytic = v.out.unwrap_or_else(|| panic!("no gradient for {path}"))[index];
        let shifted = |delta: f64| {
            let mut p = Perturb {
                path: vec![],
                target: path.into(),
                index,
                delta,
            };
            scalar(&valid.clone().map(&mut p))
        };
        let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
        let err = (analytic - fd).abs();
        println!(
            "{path}[{index}]: autodiff {analytic:.10e}, finite diff {fd:.10e}, abs err {err:.2e}"
        );
        assert!(
            err <= 1e-5 * fd.abs().max(analytic.abs()) + 1e-9,
            "{path}[{index}]: autodiff {analytic} vs fd {fd}"
        );
        assert!(
            analytic.abs() > 1e-9,
            "{path}[{index}]: gradient unexpectedly zero"
        );
    }
}
