//! Published checkpoints (fairseq, torchaudio, s3prl; assets/fixtures/published_hubert_tiny,
//! made by bench/make_published_fixtures.py) load into the same model as transformers', and a
//! hostile pickle is refused without being run.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use fedhubert_model::published::{PublishedFormat, read_published};
use fedhubert_model::{
    HostTensor, HubertConfig, ModelError, PretrainConfig, collect_tensors, cpu_device,
    read_safetensors,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/fixtures/published_hubert_tiny"
    ))
    .join(name)
}

fn max_abs_diff(t: Tensor<3>, b: &HostTensor, what: &str) -> f32 {
    assert_eq!(t.dims().to_vec(), b.shape, "{what}: shape");
    let a = t.into_data().try_into_vec_as::<f32>().unwrap();
    a.iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The file's encoder against transformers' forward of the same weights (`variant` names the
/// reference tensors): every hidden state within 1e-4.
fn check_parity(file: &str, variant: &str, format: PublishedFormat) {
    let device = cpu_device();
    let published = read_published(&fixture(file)).unwrap();
    assert_eq!(published.format, format, "{file}");
    let hf = HubertConfig::from_json_file(fixture(&format!("hf_config_{variant}.json"))).unwrap();
    let c = &published.config;
    let arch = |c: &HubertConfig| {
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.conv_dim.clone(),
            c.conv_kernel.clone(),
            c.conv_stride.clone(),
            c.conv_bias,
            c.feat_extract_norm,
            c.num_conv_pos_embeddings,
            c.num_conv_pos_embedding_groups,
            c.do_stable_layer_norm,
        )
    };
    assert_eq!(arch(c), arch(&hf), "{file}: architecture");
    let model = published.encoder(&device).unwrap().valid();
    let (reference, _) = read_safetensors(fixture("reference.safetensors")).unwrap();
    let input = &reference["input_values"];
    let wav = Tensor::<2>::from_data(
        TensorData::new(input.data.clone(), input.shape.clone()),
        &device,
    );
    let out = model.forward(wav, None, None).unwrap();
    let mut worst = max_abs_diff(
        out.extract_features,
        &reference[&format!("{variant}.extract_features")],
        "extract_features",
    );
    assert_eq!(out.hidden_states.len(), c.num_hidden_layers + 1);
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let key = format!("{variant}.hidden_states.{i}");
        worst = worst.max(max_abs_diff(h, &reference[&key], &key));
    }
    let key = format!("{variant}.last_hidden_state");
    worst = worst.max(max_abs_diff(out.last_hidden_state, &reference[&key], &key));
    println!("{file}: max abs diff {worst:.3e}");
    assert!(worst <= 1e-4, "{file}: max abs diff {worst}");
}

#[test]
fn torchaudio_state_dicts_match_transformers() {
    check_parity(
        "torchaudio_postnorm.pt",
        "postnorm",
        PublishedFormat::StateDict,
    );
    check_parity(
        "torchaudio_prenorm.pt",
        "prenorm",
        PublishedFormat::StateDict,
    );
}

#[test]
fn a_fairseq_checkpoint_matches_transformers() {
    check_parity("fairseq_postnorm.pt", "postnorm", PublishedFormat::Fairseq);
}

#[test]
fn an_s3prl_upstream_matches_transformers() {
    check_parity("s3prl_postnorm.pt", "postnorm", PublishedFormat::S3prl);
}

/// The pretraining head comes along, the same from every layout of the same weights.
#[test]
fn the_pretraining_head_is_read_from_every_layout() {
    let device = cpu_device();
    let head = |file: &str| {
        let p = read_published(&fixture(file)).unwrap();
        let (model, has_head) = p
            .for_pretraining(&PretrainConfig::default(), 0, &device)
            .unwrap();
        assert!(has_head, "{file}");
        assert_eq!(model.pretrain.num_classes, 20, "{file}");
        assert_eq!(model.pretrain.final_dim, 32, "{file}");
        let mut t = collect_tensors(&model).tensors;
        t.retain(|t| t.name.starts_with("final_proj") || t.name == "label_embs_concat");
        t
    };
    let fairseq = head("fairseq_postnorm.pt");
    assert_eq!(fairseq.len(), 3);
    assert_eq!(head("s3prl_postnorm.pt"), fairseq);
    assert_eq!(head("torchaudio_postnorm.pt"), fairseq);
}

#[test]
fn a_pickle_that_would_run_code_is_refused_and_never_run() {
    let marker = Path::new("/tmp/fedhubert-pickle-was-executed");
    let _ = std::fs::remove_file(marker);
    for file in ["malicious_root.pt", "malicious_extra.pt"] {
        let err = match read_published(&fixture(file)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{file} was accepted"),
        };
        assert!(err.contains("posix.system"), "{file}: {err}");
        assert!(err.contains("malicious"), "{file}: {err}");
        assert!(
            err.contains(file),
            "{file}: the error names the file: {err}"
        );
    }
    assert!(!marker.exists(), "a pickle was executed");
}

#[test]
fn files_that_are_not_hubert_checkpoints_get_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.pt");
    std::fs::write(&garbage, b"PK\x03\x04 this is not a zip archive at all").unwrap();
    let truncated = tmp.path().join("truncated.pt");
    let bytes = std::fs::read(fixture("fairseq_postnorm.pt")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for path in [&garbage, &truncated] {
        match read_published(path) {
            Err(e @ ModelError::File { .. }) => {
                assert!(e.to_string().contains(&*path.display().to_string()), "{e}")
            }
            Err(e) => panic!("{}: not a file error: {e}", path.display()),
            Ok(_) => panic!("{} was accepted", path.display()),
        }
    }
}
