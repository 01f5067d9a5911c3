//! Manifests that would silently mislead are errors: no `split` column, paths leaving the root,
//! and `num_samples` that disagrees with the audio.

use std::path::{Path, PathBuf};

use fedhubert_audio::scan::{scan_manifest, scan_manifest_with};
use fedhubert_audio::{AudioError, Manifest, ManifestOptions, Split};

fn write_wav(path: &Path, n: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..n {
        w.write_sample(((i % 100) as i16 - 50) * 100).unwrap();
    }
    w.finalize().unwrap();
}

/// `root/` with `root/spk/a.wav` (4000 samples) and `outside.wav` beside `root/`.
fn layout() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_wav(&root.join("spk/a.wav"), 4000);
    write_wav(&dir.path().join("outside.wav"), 4000);
    (dir, root)
}

fn manifest(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("m.csv");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn missing_split_column_names_the_file_and_the_column() {
    let (dir, root) = layout();
    let m = manifest(dir.path(), "id,path,num_samples\na,spk/a.wav,4000\n");
    let e = Manifest::load_with_root(&m, root.clone()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AudioError::Manifest { line: 1, .. }), "{msg}");
    assert!(msg.contains("m.csv") && msg.contains("`split`"), "{msg}");
    // A corpus manifest given to `prepare` needs none: the partitioner assigns the splits.
    let c = scan_manifest(&m, Some(root), false).unwrap();
    assert_eq!(c.utterances.len(), 1);
}

#[test]
fn split_cells_must_say_train_or_valid() {
    let (dir, root) = layout();
    let m = manifest(
        dir.path(),
        "id,path,split,num_samples\na,spk/a.wav,valid,4000\nb,spk/a.wav,,4000\n",
    );
    let e = Manifest::load_with_root(&m, root.clone()).unwrap_err();
    assert!(
        matches!(e, AudioError::Manifest { line: 3, .. }) && e.to_string().contains("split"),
        "{e}"
    );
    let m = manifest(
        dir.path(),
        "id,path,split,num_samples\na,spk/a.wav,valid,4000\n",
    );
    let ok = Manifest::load_with_root(&m, root).unwrap();
    assert_eq!(ok.entries[0].split, Split::Valid);
}

#[test]
fn paths_leaving_the_root_are_refused_unless_allowed() {
    let (dir, root) = layout();
    let outside = dir.path().join("outside.wav");
    for (bad, line) in [
        ("../outside.wav".to_string(), 3),
        ("spk/../../outside.wav".to_string(), 3),
        (outside.display().to_string(), 3),
    ] {
        let m = manifest(
            dir.path(),
            &format!("id,path,split,num_samples\na,spk/a.wav,train,4000\nb,{bad},train,4000\n"),
        );
        let e = Manifest::load_with_root(&m, root.clone()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, AudioError::OutsideRoot { line: l, entry, .. } if *l == line && *entry == bad),
            "{bad}: {msg}"
        );
        assert!(msg.contains("m.csv") && msg.contains(&bad), "{msg}");
        assert!(
            scan_manifest(&m, Some(root.clone()), false).is_err(),
            "{bad}"
        );
        // The explicit opt-in reads the row, and the file it names is the one outside.
        let opts = ManifestOptions {
            allow_outside_root: true,
        };
        let ok = Manifest::load_with(&m, Some(root.clone()), opts).unwrap();
        assert_eq!(
            std::fs::canonicalize(ok.abs_path(&ok.entries[1])).unwrap(),
            std::fs::canonicalize(&outside).unwrap()
        );
        let c = scan_manifest_with(&m, Some(root.clone()), false, opts).unwrap();
        assert_eq!(c.utterances.len(), 2);
    }
    // `..` that stays below the root is fine.
    let m = manifest(
        dir.path(),
        "id,path,split,num_samples\na,spk/../spk/./a.wav,train,4000\n",
    );
    assert!(Manifest::load_with_root(&m, root).is_ok());
}

#[test]
fn num_samples_that_disagrees_with_the_audio_names_id_and_both_values() {
    let (dir, root) = layout();
    let m = manifest(
        dir.path(),
        "id,path,split,num_samples\nutt-7,spk/a.wav,train,3999\n",
    );
    let man = Manifest::load_with_root(&m, root).unwrap();
    let e = man.load_entry_audio(&man.entries[0]).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            AudioError::NumSamplesMismatch {
                manifest: 3999,
                decoded: 4000,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("utt-7") && msg.contains("3999") && msg.contains("4000"),
        "{msg}"
    );
    let mut right = man.entries[0].clone();
    right.num_samples = 4000;
    assert_eq!(man.load_entry_audio(&right).unwrap().samples.len(), 4000);
    assert!(right.check_decoded_len(4000).is_ok());
}
