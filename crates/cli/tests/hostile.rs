//! Hostile input through the real binary: every case exits non-zero and its message names the
//! file, field or folder at fault. None of these needs a trained model, so they run in seconds.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fail as refused, fedhubert, root};

fn pretrain_with(config: &Path, set: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "pretrain",
        "--simulation",
        "--config",
        config.to_str().unwrap(),
        "--clients",
        "no-such-partition",
        "--out",
        out.to_str().unwrap(),
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    refused(&args)
}

#[test]
fn pretrain_and_distill_need_a_config_or_a_named_preset() {
    for args in [["pretrain", "--simulation"], ["distill", "--mode=server"]] {
        let e = refused(&[args[0], args[1], "--clients", "x", "--out", "y"]);
        assert!(e.contains("--config"), "{args:?}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing but a comment\n").unwrap();
    let e = pretrain_with(&empty, &[]);
    assert!(e.contains("empty.yaml") && e.contains("empty"), "{e}");
}

#[test]
fn config_type_errors_name_the_field_and_line_or_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "pretraining:\n  preset: tiny\n  learning_rate: fast\n",
    )
    .unwrap();
    let e = pretrain_with(&bad, &[]);
    assert!(
        e.contains("bad.yaml") && e.contains("pretraining.learning_rate") && e.contains("line 3"),
        "{e}"
    );
    let tiny = root().join("configs/tiny.yaml");
    let e = pretrain_with(&tiny, &["pretraining.learning_rate=fast"]);
    assert!(e.contains("--set pretraining.learning_rate=fast"), "{e}");
    // Checked under the run file's names, not the model's (mask_time_prob) or Flower's.
    let e = pretrain_with(&tiny, &["pretraining.mask_prob=2"]);
    assert!(
        e.contains("mask_prob") && !e.contains("mask_time_prob"),
        "{e}"
    );
    let e = pretrain_with(&tiny, &["federated.client_fraction=0"]);
    assert!(
        e.contains("client_fraction") && !e.contains("fraction_fit"),
        "{e}"
    );
}

#[test]
fn audio_lengths_below_the_receptive_field_are_refused() {
    let tiny = root().join("configs/tiny.yaml");
    for key in ["min_audio_length", "max_audio_length"] {
        let e = pretrain_with(&tiny, &[&format!("pretraining.{key}=100")]);
        assert!(
            e.contains(&format!("pretraining.{key}")) && e.contains("400"),
            "{e}"
        );
    }
}

#[test]
fn a_deeply_nested_config_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.yaml");
    let n = 20_000;
    std::fs::write(&deep, format!("a: {}{}\n", "[".repeat(n), "]".repeat(n))).unwrap();
    // "nested N levels deep" comes from the check before parsing (the parser took 27 s to
    // reject such a file), so the message shows the parser never saw it.
    let e = pretrain_with(&deep, &[]);
    assert!(
        e.contains("deep.yaml") && e.contains("nested 20001 levels"),
        "{e}"
    );
}

#[test]
fn thread_counts_are_bounded() {
    let e = refused(&["features", "--clients", "x", "--threads", "100000"]);
    assert!(e.contains("--threads") && e.contains("1024"), "{e}");
}

#[test]
fn a_folder_another_run_writes_is_refused_naming_that_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parts");
    let lock = fedhubert_fl::FolderLock::acquire(&out, "prepare").unwrap();
    let e = refused(&[
        "prepare",
        "--data",
        "assets/librispeech-sample",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("in use by another fedhubert run"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    drop(lock);
}

#[test]
fn a_broken_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{\"hidden_size\": \"wide\"").unwrap();
    std::fs::write(hf.join("model.safetensors"), b"").unwrap();
    let wav = root().join("assets/speech-commands-sample");
    let clip = std::fs::read_dir(&wav)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wav"))
        .expect("a bundled clip");
    let e = refused(&[
        "embed",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--audio",
        clip.to_str().unwrap(),
        "--out",
        dir.path().join("e.safetensors").to_str().unwrap(),
    ]);
    assert!(e.contains("config.json"), "{e}");
}

fn sample_dir() -> PathBuf {
    root().join("assets/librispeech-sample")
}

/// A manifest of two bundled utterances (with `columns` and `rows` edited by the caller).
fn manifest(dir: &Path, header: &str, rows: &[String]) -> PathBuf {
    let m = dir.join("manifest.csv");
    std::fs::write(&m, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
    m
}

const HEADER: &str = "id,path,split,num_samples,sample_rate,speaker,chapter,transcript";
const UTT: &str = "test-clean/1089/134686/1089-134686-0001.flac";

fn features_of(m: &Path, out: &Path, extra: &[&str]) -> Output {
    let root = sample_dir();
    let mut args = vec![
        "features",
        "--manifest",
        m.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    fedhubert(&args)
}

fn decoded_len() -> u64 {
    fedhubert_audio::load_audio(&sample_dir().join(UTT))
        .unwrap()
        .samples
        .len() as u64
}

#[test]
fn manifests_need_a_split_paths_inside_the_root_and_true_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("feats");
    let n = decoded_len();
    let good = format!("u1,{UTT},train,{n},16000,1089,134686,");
    // No split column: every row would have been a training row.
    let m = manifest(
        dir.path(),
        "id,path,num_samples,sample_rate,speaker,chapter,transcript",
        &[format!("u1,{UTT},{n},16000,1089,134686,")],
    );
    let o = features_of(&m, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("manifest.csv") && e.contains("split"),
        "{e}"
    );
    // A path that leaves the root: refused, unless asked for.
    let outside = format!("u1,../librispeech-sample/{UTT},train,{n},16000,1089,134686,");
    let m = manifest(dir.path(), HEADER, &[outside]);
    let o = features_of(&m, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("../librispeech-sample")
            && e.contains("--allow-outside-root"),
        "{e}"
    );
    let o = features_of(&m, &out, &["--allow-outside-root"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // num_samples that disagrees with the audio.
    let m = manifest(
        dir.path(),
        HEADER,
        &[good.replace(&format!(",{n},"), &format!(",{},", n + 1600))],
    );
    let o = features_of(&m, &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("u1") && e.contains(&n.to_string()),
        "{e}"
    );
}

#[test]
fn a_flac_header_claiming_2_pow_36_samples_does_not_abort_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus/1089/134686");
    std::fs::create_dir_all(&corpus).unwrap();
    let mut flac = std::fs::read(sample_dir().join(UTT)).unwrap();
    // STREAMINFO's packed field at byte 18: rate:20, channels-1:3, bits-1:5, total samples:36.
    let f = &mut flac[18..26];
    let v = u64::from_be_bytes(f.try_into().unwrap()) | ((1u64 << 36) - 1);
    f.copy_from_slice(&v.to_be_bytes());
    std::fs::write(corpus.join("1089-134686-0001.flac"), &flac).unwrap();
    std::fs::write(corpus.join("1089-134686-0002.flac"), &flac).unwrap();
    let o = fedhubert(&[
        "prepare",
        "--data",
        dir.path().join("corpus").to_str().unwrap(),
        "--out",
        dir.path().join("parts").to_str().unwrap(),
        "--num-clients",
        "1",
        "--skip-bad",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !e.contains("memory allocation") && !e.contains("panicked"),
        "{e}"
    );
    assert!(o.status.code().is_some(), "killed by a signal: {e}");
}

/// 16-bit mono PCM WAV bytes.
fn wav(samples: &[i16]) -> Vec<u8> {
    let data = samples.len() as u32 * 2;
    let mut b = Vec::new();
    b.extend(b"RIFF");
    b.extend((36 + data).to_le_bytes());
    b.extend(b"WAVEfmt ");
    b.extend(16u32.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(16_000u32.to_le_bytes());
    b.extend(32_000u32.to_le_bytes());
    b.extend(2u16.to_le_bytes());
    b.extend(16u16.to_le_bytes());
    b.extend(b"data");
    b.extend(data.to_le_bytes());
    b.extend(samples.iter().flat_map(|s| s.to_le_bytes()));
    b
}

#[test]
fn audio_shorter_than_one_frame_is_an_error_in_embed() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.wav");
    std::fs::write(&short, wav(&[100; 300])).unwrap();
    let hf = root().join("assets/fixtures/hf_hubert_tiny_postnorm");
    let e = refused(&[
        "embed",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--audio",
        short.to_str().unwrap(),
        "--out",
        dir.path().join("e.safetensors").to_str().unwrap(),
    ]);
    assert!(e.contains("short.wav") && e.contains("400"), "{e}");
}

#[test]
fn a_long_file_is_refused_whole_and_embedded_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("six-minutes.wav");
    let n = 16_000 * 360;
    std::fs::write(
        &long,
        wav(&(0..n).map(|i| ((i % 97) * 50) as i16).collect::<Vec<_>>()),
    )
    .unwrap();
    let hf = root().join("assets/fixtures/hf_hubert_tiny_postnorm");
    let out = dir.path().join("e.safetensors");
    let args = |extra: &'static [&'static str]| {
        let mut v = vec![
            "embed".to_string(),
            "--checkpoint".into(),
            hf.to_str().unwrap().into(),
            "--audio".into(),
            long.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let whole = args(&[]);
    let e = refused(&whole.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("six-minutes.wav") && e.contains("--chunk-seconds"),
        "{e}"
    );
    let pieces = args(&["--chunk-seconds", "30"]);
    let o = fedhubert(&pieces.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("360.00 s of audio"));
}

/// Logs to a pipe or a file are plain text: no ANSI colour codes (issue 20).
#[test]
fn logs_written_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parts");
    let o = fedhubert(&[
        "prepare",
        "--data",
        "no-such-corpus",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("scanning"), "the info log is there: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a piped log: {err:?}"
    );
}
