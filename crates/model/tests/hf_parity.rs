//! Parity with HuggingFace `HubertModel` (transformers 5.23, eval mode) on the tiny fixtures,
//! and HF import / export checks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use fedhubert_model::{
    HostTensor, HubertConfig, HubertModel, ModelError, collect_tensors, cpu_device,
    read_safetensors,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/fixtures"
    ))
    .join(name)
}

fn to_host(t: Tensor<3>) -> HostTensor {
    HostTensor {
        name: String::new(),
        shape: t.dims().to_vec(),
        data: t.into_data().try_into_vec_as::<f32>().unwrap(),
    }
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor, what: &str) -> f32 {
    assert_eq!(a.shape, b.shape, "{what}: shape");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_parity(dir: &str) {
    let device = cpu_device();
    let model = HubertModel::from_hf_dir(fixture(dir), &device)
        .unwrap()
        .valid();
    let (reference, _) = read_safetensors(fixture(dir).join("reference_io.safetensors")).unwrap();
    let input = &reference["input_values"];
    let wav = Tensor::<2>::from_data(
        TensorData::new(input.data.clone(), input.shape.clone()),
        &device,
    );
    let out = model.forward(wav, None, None).unwrap();

    let mut worst = 0.0f32;
    let d = max_abs_diff(
        &to_host(out.extract_features),
        &reference["extract_features"],
        "extract_features",
    );
    println!("{dir}: extract_features max abs diff {d:.3e}");
    worst = worst.max(d);
    let n = model.config().num_hidden_layers;
    assert_eq!(out.hidden_states.len(), n + 1);
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let key = format!("hidden_states.{i}");
        let d = max_abs_diff(&to_host(h), &reference[&key], &key);
        println!("{dir}: {key} max abs diff {d:.3e}");
        worst = worst.max(d);
    }
    let d = max_abs_diff(
        &to_host(out.last_hidden_state),
        &reference["last_hidden_state"],
        "last_hidden_state",
    );
    println!("{dir}: last_hidden_state max abs diff {d:.3e}");
    worst = worst.max(d);
    assert!(worst < 1e-4, "{dir}: max abs diff {worst}");
}

#[test]
fn parity_tiny_postnorm_group_norm() {
    check_parity("hf_hubert_tiny_postnorm");
}

#[test]
fn parity_tiny_prenorm_layer_norm() {
    check_parity("hf_hubert_tiny_prenorm");
}

fn copy_fixture_with(dir: &str, out: &Path, edit: impl FnOnce(&mut BTreeMap<String, HostTensor>)) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(fixture(dir).join("config.json"), out.join("config.json")).unwrap();
    let (mut t, _) = read_safetensors(fixture(dir).join("model.safetensors")).unwrap();
    edit(&mut t);
    // The map's key is the name written.
    let v: fedhubert_model::Weights = t
        .into_iter()
        .map(|(name, t)| HostTensor { name, ..t })
        .collect();
    fedhubert_model::write_safetensors(out.join("model.safetensors"), &v, HashMap::new()).unwrap();
}

#[test]
fn import_accepts_legacy_weight_norm_names() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture_with("hf_hubert_tiny_postnorm", tmp.path(), |t| {
        let g = t
            .remove("encoder.pos_conv_embed.conv.parametrizations.weight.original0")
            .unwrap();
        let v = t
            .remove("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
            .unwrap();
        t.insert("encoder.pos_conv_embed.conv.weight_g".into(), g);
        t.insert("encoder.pos_conv_embed.conv.weight_v".into(), v);
    });
    let device = cpu_device();
    let legacy = HubertModel::from_hf_dir(tmp.path(), &device).unwrap();
    let current = HubertModel::from_hf_dir(fixture("hf_hubert_tiny_postnorm"), &device).unwrap();
    assert_eq!(collect_tensors(&legacy), collect_tensors(&current));
}

#[test]
fn import_errors_name_the_key() {
    let device = cpu_device();
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture_with(
        "hf_hubert_tiny_postnorm",
        &tmp.path().join("missing"),
        |t| {
            t.remove("encoder.layers.1.attention.k_proj.bias");
        },
    );
    match HubertModel::from_hf_dir(tmp.path().join("missing"), &device) {
        Err(ModelError::MissingKeys(k)) => {
            assert_eq!(k, vec!["encoder.layers.1.attention.k_proj.bias"])
        }
        other => panic!("expected MissingKeys, got {other:?}"),
    }
    copy_fixture_with(
        "hf_hubert_tiny_postnorm",
        &tmp.path().join("unexpected"),
        |t| {
            t.insert(
                "lm_head.weight".into(),
                HostTensor {
                    name: String::new(),
                    shape: vec![2],
                    data: vec![0.0, 1.0],
                },
            );
        },
    );
    match HubertModel::from_hf_dir(tmp.path().join("unexpected"), &device) {
        Err(ModelError::UnexpectedKeys(k)) => assert_eq!(k, vec!["lm_head.weight"]),
        other => panic!("expected UnexpectedKeys, got {other:?}"),
    }
    copy_fixture_with("hf_hubert_tiny_postnorm", &tmp.path().join("shape"), |t| {
        t.insert(
            "masked_spec_embed".into(),
            HostTensor {
                name: String::new(),
                shape: vec![47],
                data: vec![0.0; 47],
            },
        );
    });
    match HubertModel::from_hf_dir(tmp.path().join("shape"), &device) {
        Err(ModelError::ShapeMismatch {
            key,
            expected,
            found,
        }) => {
            assert_eq!(key, "masked_spec_embed");
            assert_eq!((expected, found), (vec![48], vec![47]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn export_then_load_round_trips_bit_exactly() {
    let device = cpu_device();
    let tmp = tempfile::tempdir().unwrap();
    for (i, cfg) in [
        HubertConfig::tiny(),
        HubertConfig {
            do_stable_layer_norm: true,
            feat_extract_norm: fedhubert_model::FeatExtractNorm::Layer,
            conv_bias: true,
            ..HubertConfig::tiny()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("m{i}"));
        let model = HubertModel::new(&cfg, 42 + i as u64, &device).unwrap();
        model.save_hf(&dir).unwrap();
        // No temporary files left behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "config.json",
                "model.safetensors",
                "preprocessor_config.json"
            ]
        );

        let (tensors, meta) = read_safetensors(dir.join("model.safetensors")).unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        let file_keys: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        let mut model_keys = model.hf_param_shapes();
        model_keys.sort();
        assert_eq!(file_keys, model_keys);
        assert!(
            tensors.contains_key("encoder.pos_conv_embed.conv.parametrizations.weight.original0")
        );

        let loaded = HubertModel::from_hf_dir(&dir, &device).unwrap();
        assert_eq!(loaded.config(), model.config());
        assert_eq!(collect_tensors(&loaded), collect_tensors(&model));

        let pre: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(pre["feature_extractor_type"], "Wav2Vec2FeatureExtractor");
        assert_eq!(pre["feature_size"], 1);
        assert_eq!(pre["sampling_rate"], 16000);
        assert_eq!(pre["padding_value"], 0.0);
        let layer = i == 1;
        assert_eq!(pre["do_normalize"], layer);
        assert_eq!(pre["return_attention_mask"], layer);
        let cfg_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg_json["architectures"][0], "HubertModel");
        assert_eq!(cfg_json["model_type"], "hubert");
    }
}

#[test]
fn base_keys_shapes_and_param_count_match_hf() {
    let text = std::fs::read_to_string(fixture("hf_hubert_base_keys.tsv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("name\tshape"));
    let mut expected: Vec<(String, Vec<usize>)> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once('\t').unwrap();
            let shape = shape
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (name.to_string(), shape)
        })
        .collect();
    expected.sort();
    let model = HubertModel::new(&HubertConfig::base(), 0, &cpu_device()).unwrap();
    let mut got = model.hf_param_shapes();
    got.sort();
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    let count: usize = got.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    println!("HuBERT Base parameter count: {count}");
    assert_eq!(count, 94_371_712);
    assert_eq!(model.num_params(), 94_371_712);
}
