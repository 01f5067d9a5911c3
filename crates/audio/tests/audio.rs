//! Decoding, resampling, scanning and bad-input handling on real and synthetic audio.

use std::path::{Path, PathBuf};

use fedhubert_audio::scan::{scan_dir, scan_manifest};
use fedhubert_audio::{AudioError, MODEL_SAMPLE_RATE, load_audio};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn write_wav(path: &Path, rate: u32, channels: u16, frames: &[Vec<f32>]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for fr in frames {
        for &s in fr {
            w.write_sample((s * 32767.0) as i16).unwrap();
        }
    }
    w.finalize().unwrap();
}

fn sine(rate: u32, freq: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin())
        .collect()
}

#[test]
fn decodes_real_librispeech_flac() {
    let p = assets().join("librispeech-sample/test-clean/1089/134686/1089-134686-0000.flac");
    let a = load_audio(&p).unwrap();
    assert_eq!(a.orig_sample_rate, 16_000);
    assert_eq!(a.orig_channels, 1);
    // 1042 Kaldi frames (25 ms / 10 ms, snip_edges) in the MFCC fixture of this file.
    assert_eq!(1 + (a.samples.len() - 400) / 160, 1042);
    assert!(a.samples.iter().all(|s| (-1.0..=1.0).contains(s)));
    assert!(
        a.samples.iter().any(|s| s.abs() > 0.1),
        "decoded audio is silent"
    );
}

#[test]
fn stereo_is_downmixed_and_other_rates_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let l = sine(16_000, 440.0, 16_000);
    let frames: Vec<Vec<f32>> = l.iter().map(|&s| vec![s, 0.0]).collect();
    let p = dir.path().join("st.wav");
    write_wav(&p, 16_000, 2, &frames);
    let a = load_audio(&p).unwrap();
    assert_eq!(a.orig_channels, 2);
    let max = a.samples.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!(
        (max - 0.25).abs() < 0.01,
        "downmix averages channels: peak {max}"
    );

    let x = sine(8_000, 440.0, 8_000);
    let p = dir.path().join("8k.wav");
    write_wav(
        &p,
        8_000,
        1,
        &x.iter().map(|&s| vec![s]).collect::<Vec<_>>(),
    );
    let a = load_audio(&p).unwrap();
    assert_eq!(a.orig_sample_rate, 8_000);
    assert_eq!(a.samples.len(), 16_000);
    // The 440 Hz tone survives resampling: compare with the ideal 16 kHz sine away from the edges.
    let ideal = sine(MODEL_SAMPLE_RATE, 440.0, 16_000);
    let err = a.samples[2000..14000]
        .iter()
        .zip(&ideal[2000..14000])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.01, "resampled sine deviates by {err}");
}

#[test]
fn bad_files_name_the_file_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let not_audio = dir.path().join("notes.flac");
    std::fs::write(&not_audio, b"this is not audio at all").unwrap();
    let e = load_audio(&not_audio).unwrap_err();
    assert!(matches!(e, AudioError::Decode { .. }), "{e}");
    assert!(e.to_string().contains("notes.flac"), "{e}");

    let real = std::fs::read(
        assets().join("librispeech-sample/test-clean/1089/134686/1089-134686-0000.flac"),
    )
    .unwrap();
    let trunc = dir.path().join("trunc.flac");
    std::fs::write(&trunc, &real[..real.len() / 2]).unwrap();
    let e = load_audio(&trunc).unwrap_err();
    assert!(
        e.to_string().contains("trunc.flac") && e.to_string().contains("truncated"),
        "{e}"
    );

    let wav = dir.path().join("w.wav");
    write_wav(
        &wav,
        16_000,
        1,
        &sine(16_000, 200.0, 1000)
            .iter()
            .map(|&s| vec![s])
            .collect::<Vec<_>>(),
    );
    let bytes = std::fs::read(&wav).unwrap();
    let twav = dir.path().join("tw.wav");
    std::fs::write(&twav, &bytes[..bytes.len() - 501]).unwrap();
    let e = load_audio(&twav).unwrap_err();
    assert!(e.to_string().contains("tw.wav"), "{e}");

    let empty = dir.path().join("empty.wav");
    write_wav(&empty, 16_000, 1, &[]);
    let e = load_audio(&empty).unwrap_err();
    assert!(
        matches!(e, AudioError::Empty { .. }) && e.to_string().contains("empty.wav"),
        "{e}"
    );

    let missing = dir.path().join("missing.flac");
    let e = load_audio(&missing).unwrap_err();
    assert!(
        matches!(e, AudioError::Io { .. }) && e.to_string().contains("missing.flac"),
        "{e}"
    );

    let e = load_audio(&dir.path().join("x.mp3")).unwrap_err();
    assert!(matches!(e, AudioError::Unsupported { .. }), "{e}");
}

#[test]
fn scan_reads_librispeech_layout_with_optional_transcripts() {
    let c = scan_dir(&assets().join("librispeech-sample"), false).unwrap();
    assert_eq!(c.utterances.len(), 78);
    assert!(c.skipped.is_empty());
    let u = c
        .utterances
        .iter()
        .find(|u| u.id == "1089-134686-0000")
        .unwrap();
    assert_eq!((u.speaker.as_str(), u.chapter.as_str()), ("1089", "134686"));
    assert!(
        u.transcript
            .starts_with("HE HOPED THERE WOULD BE STEW FOR DINNER"),
        "{}",
        u.transcript
    );
    assert_eq!(u.path, "test-clean/1089/134686/1089-134686-0000.flac");
    let unlabelled = c
        .utterances
        .iter()
        .filter(|u| u.transcript.is_empty())
        .count();
    assert_eq!(unlabelled, 74, "only speaker 1089 has transcripts");
}

#[test]
fn scan_errors_and_skip_bad() {
    let dir = tempfile::tempdir().unwrap();
    let e = scan_dir(dir.path(), false).unwrap_err();
    assert!(matches!(e, AudioError::NoAudio { .. }), "{e}");

    let a = dir.path().join("spk1/a.wav");
    write_wav(
        &a,
        16_000,
        1,
        &sine(16_000, 300.0, 4000)
            .iter()
            .map(|&s| vec![s])
            .collect::<Vec<_>>(),
    );
    std::fs::write(
        dir.path()
            .join("spk2/b.flac")
            .parent()
            .map(|p| std::fs::create_dir_all(p))
            .map(|_| dir.path().join("spk2/b.flac"))
            .unwrap(),
        b"garbage",
    )
    .unwrap();
    let e = scan_dir(dir.path(), false).unwrap_err();
    assert!(e.to_string().contains("b.flac"), "{e}");
    let c = scan_dir(dir.path(), true).unwrap();
    assert_eq!(c.utterances.len(), 1);
    assert_eq!(
        c.utterances[0].speaker, "spk1",
        "plain folders take the parent folder as speaker"
    );
    assert_eq!(c.skipped.len(), 1);
    assert_eq!(c.skipped[0].path, "spk2/b.flac");

    // A manifest listing a missing file.
    let m = dir.path().join("m.csv");
    std::fs::write(
        &m,
        "id,path,num_samples\na,spk1/a.wav,4000\nz,spk9/z.wav,100\n",
    )
    .unwrap();
    let e = scan_manifest(&m, Some(dir.path().to_path_buf()), false).unwrap_err();
    assert!(e.to_string().contains("z.wav"), "{e}");
    let c = scan_manifest(&m, Some(dir.path().to_path_buf()), true).unwrap();
    assert_eq!(c.utterances.len(), 1);
    std::fs::write(&m, "id,path\na,spk1/a.wav\n").unwrap();
    let e = scan_manifest(&m, Some(dir.path().to_path_buf()), false).unwrap_err();
    assert!(e.to_string().contains("num_samples"), "{e}");
}
