//! Masked-prediction head, checkpointing, padding, feature_grad_mult and gradient clipping.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor, TensorData};
use fedhubert_model::{
    FeatExtractNorm, HeadKind, HubertConfig, HubertForPretraining, HubertModel, PretrainBatch,
    PretrainConfig, collect_tensors, cpu_device,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn batch(
    device: &burn::tensor::Device,
    b: usize,
    samples: usize,
    num_classes: u32,
) -> PretrainBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    use rand::Rng;
    let wav: Vec<f32> = (0..b * samples)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let labels = (0..b)
        .map(|i| {
            (0..(samples / 160))
                .map(|t| ((t / 7 + i) as u32) % num_classes)
                .collect()
        })
        .collect();
    PretrainBatch {
        waveform: Tensor::from_data(TensorData::new(wav, [b, samples]), device),
        sample_lengths: None,
        labels,
    }
}

#[test]
fn pretrain_forward_losses_and_accuracy() {
    let device = cpu_device().autodiff();
    for head in [HeadKind::Cosine, HeadKind::Linear] {
        let pcfg = PretrainConfig {
            num_classes: 10,
            final_dim: 8,
            head,
            ..Default::default()
        };
        let model = HubertForPretraining::new(&HubertConfig::tiny(), &pcfg, 3, &device).unwrap();
        let b = batch(&device, 2, 8000, 10);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let out = model.forward_pretrain(&b, &mut rng).unwrap();
        // 8000 samples -> 24 frames; 100 Hz labels (50 of them) keep all 24 frames.
        assert_eq!(out.count_masked + out.count_unmasked, 2 * 24);
        assert!(out.count_masked > 0 && out.count_unmasked > 0);
        assert_eq!(out.sample_size, out.count_masked);
        assert!(out.correct_masked <= out.count_masked);
        let loss = out
            .loss
            .clone()
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap()[0];
        let expect = out.loss_masked + 10.0 * out.features_pen;
        assert!(
            (loss - expect).abs() < 1e-4 * expect.abs().max(1.0),
            "{loss} vs {expect}"
        );
        // Untrained model: CE close to ln(10) order of magnitude, finite.
        assert!(out.loss_masked.is_finite() && out.loss_masked > 0.0);
        let grads = out.loss.backward();
        let g = model
            .final_proj
            .weight
            .val()
            .grad(&grads)
            .expect("head gets a gradient");
        assert!(g.abs().sum().into_scalar::<f32>() > 0.0);
        if head == HeadKind::Cosine {
            assert!(
                model
                    .label_embs_concat
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .is_some()
            );
        }
    }
}

#[test]
fn unmasked_weight_enters_sample_size() {
    let device = cpu_device();
    let pcfg = PretrainConfig {
        num_classes: 10,
        final_dim: 8,
        pred_nomask_weight: 0.5,
        ..Default::default()
    };
    let model = HubertForPretraining::new(&HubertConfig::tiny(), &pcfg, 3, &device)
        .unwrap()
        .valid();
    let b = batch(&device, 1, 8000, 10);
    let out = model
        .forward_pretrain(&b, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(out.sample_size, out.count_masked + out.count_unmasked);
    let loss = out.loss.into_data().try_into_vec_as::<f64>().unwrap()[0];
    let n = out.sample_size as f64;
    let expect = (out.loss_masked * out.count_masked as f64
        + 0.5 * out.loss_unmasked * out.count_unmasked as f64)
        / n
        + 10.0 * out.features_pen;
    assert!((loss - expect).abs() < 1e-4, "{loss} vs {expect}");
}

#[test]
fn label_trimming_and_padding_exclusion() {
    let device = cpu_device();
    let pcfg = PretrainConfig {
        num_classes: 10,
        final_dim: 8,
        label_rate: 50.0,
        ..Default::default()
    };
    let model = HubertForPretraining::new(&HubertConfig::tiny(), &pcfg, 3, &device)
        .unwrap()
        .valid();
    let mut b = batch(&device, 2, 8000, 10); // 24 frames
    b.labels = vec![vec![1; 20], vec![2; 15]]; // 50 Hz labels: trim to 20 frames; utt 1 has 15
    b.sample_lengths = Some(vec![8000, 4000]); // utt 1: 12 valid frames
    let out = model
        .forward_pretrain_with(&b, |bs, t, lens| {
            assert_eq!((bs, t), (2, 20));
            assert_eq!(lens, Some(&[20usize, 12][..]));
            vec![vec![true; t]; bs]
        })
        .unwrap();
    assert_eq!(out.count_masked, 20 + 12);
    assert_eq!(out.count_unmasked, 0);
}

#[test]
fn feature_grad_mult_scales_front_end_gradient_only() {
    let device = cpu_device().autodiff();
    let mut grads_by_mult = Vec::new();
    for mult in [1.0, 0.1] {
        let pcfg = PretrainConfig {
            num_classes: 10,
            final_dim: 8,
            feature_grad_mult: mult,
            feature_pen_weight: 0.0,
            ..Default::default()
        };
        let model = HubertForPretraining::new(&HubertConfig::tiny(), &pcfg, 9, &device).unwrap();
        let b = batch(&device, 1, 6400, 10);
        let out = model
            .forward_pretrain(&b, &mut ChaCha8Rng::seed_from_u64(2))
            .unwrap();
        let loss = out
            .loss
            .clone()
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap()[0];
        let grads = out.loss.backward();
        let conv = model.hubert.feature_extractor.conv_layers[3]
            .conv
            .weight
            .val()
            .grad(&grads)
            .unwrap();
        let proj = model
            .hubert
            .feature_projection
            .projection
            .weight
            .val()
            .grad(&grads)
            .unwrap();
        grads_by_mult.push((
            loss,
            conv.into_data().try_into_vec_as::<f32>().unwrap(),
            proj.into_data().try_into_vec_as::<f32>().unwrap(),
        ));
    }
    let (l1, c1, p1) = &grads_by_mult[0];
    let (l2, c2, p2) = &grads_by_mult[1];
    // x*m + x.detach()*(1-m) equals x up to float rounding.
    assert!(
        (l1 - l2).abs() < 1e-5 * l1.abs(),
        "forward must not change: {l1} vs {l2}"
    );
    // Tolerance relative to the largest entry: float noise from the rounding above is ~1e-5.
    let scale = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (sc, sp) = (scale(c1), scale(p1));
    assert!(sc > 0.0 && sp > 0.0);
    for (a, b) in c1.iter().zip(c2) {
        assert!(
            (a * 0.1 - b).abs() <= 1e-3 * 0.1 * sc,
            "conv grad {a} * 0.1 != {b}"
        );
    }
    for (a, b) in p1.iter().zip(p2) {
        assert!(
            (a - b).abs() <= 1e-3 * sp,
            "projection grad changed: {a} vs {b}"
        );
    }
}

#[test]
fn checkpoint_round_trip_includes_heads() {
    let device = cpu_device();
    let pcfg = PretrainConfig {
        num_classes: 12,
        final_dim: 8,
        ..Default::default()
    };
    let model = HubertForPretraining::new(&HubertConfig::tiny(), &pcfg, 21, &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt.safetensors");
    model.save_checkpoint(&path).unwrap();
    let loaded = HubertForPretraining::load_checkpoint(&path, &device).unwrap();
    let a = collect_tensors(&model);
    assert!(a.get("label_embs_concat").is_some());
    assert!(
        a.get("hubert.encoder.layers.1.final_layer_norm.weight")
            .is_some()
    );
    assert_eq!(a, collect_tensors(&loaded));
    assert_eq!(loaded.pretrain, pcfg);

    // HF export keeps the head out of model.safetensors.
    let dir = tmp.path().join("hf");
    model.save_hf(&dir).unwrap();
    let (keys, _) = fedhubert_model::read_safetensors(dir.join("model.safetensors")).unwrap();
    assert!(
        keys.keys()
            .all(|k| !k.starts_with("final_proj") && !k.starts_with("label_embs"))
    );
    let back = HubertForPretraining::from_hf_dir(&dir, &device).unwrap();
    assert_eq!(collect_tensors(&back), a);
}

#[test]
fn padded_batch_matches_unpadded_utterance() {
    // Layer-norm extractor (no statistics over time), pre-LN encoder.
    let cfg = HubertConfig {
        feat_extract_norm: FeatExtractNorm::Layer,
        do_stable_layer_norm: true,
        conv_bias: true,
        ..HubertConfig::tiny()
    };
    let device = cpu_device();
    let model = HubertModel::new(&cfg, 4, &device).unwrap().valid();
    let short = Tensor::<2>::random([1, 8000], Distribution::Uniform(-1.0, 1.0), &device);
    let padded = Tensor::cat(vec![short.clone(), Tensor::zeros([1, 4800], &device)], 1);
    let other = Tensor::<2>::random([1, 12800], Distribution::Uniform(-1.0, 1.0), &device);
    let alone = model.forward(short, None, None).unwrap();
    let both = model
        .forward(
            Tensor::cat(vec![padded, other], 0),
            Some(&[8000, 12800]),
            None,
        )
        .unwrap();
    let t = alone.last_hidden_state.dims()[1];
    assert_eq!(t, 24);
    let a = alone
        .last_hidden_state
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let b = both
        .last_hidden_state
        .narrow(0, 0, 1)
        .narrow(1, 0, t)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    println!("padding max abs diff {d:.3e}");
    assert!(d < 1e-4, "padded utterance differs by {d}");
}

#[test]
fn full_mask_replaces_every_frame_by_masked_spec_embed() {
    let device = cpu_device();
    let model = HubertModel::new(&HubertConfig::tiny(), 8, &device)
        .unwrap()
        .valid();
    let mask = fedhubert_model::mask_to_tensor(&vec![vec![true; 24]; 2], &device);
    let wav = Tensor::<2>::random([2, 8000], Distribution::Uniform(-1.0, 1.0), &device);
    let out = model.forward(wav.clone(), None, Some(mask)).unwrap();
    let h = out
        .last_hidden_state
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    // Both utterances see only the embedding: identical outputs.
    let (a, b) = h.split_at(h.len() / 2);
    assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6));
    let unmasked = model
        .forward(wav, None, None)
        .unwrap()
        .last_hidden_state
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert!(unmasked.iter().zip(&h).any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn dropout_and_layerdrop_only_in_training() {
    let cfg = HubertConfig {
        hidden_dropout: 0.2,
        layerdrop: 0.5,
        ..HubertConfig::tiny()
    };
    let device = cpu_device().autodiff();
    device.seed(1);
    let model = HubertModel::new(&cfg, 8, &device).unwrap();
    let wav = Tensor::<2>::random([1, 8000], Distribution::Uniform(-1.0, 1.0), &device);
    let run = |m: &HubertModel, w: Tensor<2>| {
        m.forward(w, None, None)
            .unwrap()
            .last_hidden_state
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let t1 = run(&model, wav.clone());
    let t2 = run(&model, wav.clone());
    assert!(
        t1.iter().zip(&t2).any(|(x, y)| (x - y).abs() > 1e-4),
        "training forward must be stochastic"
    );
    let valid = model.valid();
    let w = wav.inner();
    assert_eq!(run(&valid, w.clone()), run(&valid, w));
}
