//! Partition determinism, the speaker property, Dirichlet skew, train/valid split, output layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedhubert_audio::partition::{Method, PartitionConfig, partition, write_partition};
use fedhubert_audio::scan::{Corpus, scan_dir};
use fedhubert_audio::{Entry, Manifest, Split};

fn sample() -> Corpus {
    scan_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/librispeech-sample"),
        false,
    )
    .unwrap()
}

fn cfg(method: Method, n: usize, seed: u64) -> PartitionConfig {
    PartitionConfig {
        method,
        num_clients: n,
        seed,
        valid_fraction: 0.2,
        min_client_utterances: 2,
    }
}

/// A synthetic corpus: `spk` speakers with `per` utterances each (no audio needed for partitioning).
fn synthetic(spk: usize, per: usize) -> Corpus {
    let mut utterances = Vec::new();
    for s in 0..spk {
        for u in 0..per {
            utterances.push(Entry {
                id: format!("{s}-0-{u}"),
                path: format!("{s}/0/{s}-0-{u}.flac"),
                split: Split::Train,
                num_samples: 16_000 + (u as u64 * 997 + s as u64 * 131) % 50_000,
                sample_rate: 16_000,
                speaker: s.to_string(),
                chapter: "0".into(),
                transcript: String::new(),
            });
        }
    }
    Corpus {
        root: PathBuf::from("/nonexistent"),
        utterances,
        skipped: vec![],
    }
}

#[test]
fn speaker_partition_is_deterministic_disjoint_and_balanced() {
    let c = sample();
    let a = partition(&c, &cfg(Method::Speaker, 10, 7)).unwrap();
    let b = partition(&c, &cfg(Method::Speaker, 10, 7)).unwrap();
    assert_eq!(a, b, "same seed, same partition");
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, client) in a.iter().enumerate() {
        for e in client {
            if let Some(prev) = owner.insert(&e.speaker, k) {
                assert_eq!(prev, k, "speaker {} on clients {prev} and {k}", e.speaker);
            }
        }
    }
    assert_eq!(
        a.iter().map(Vec::len).sum::<usize>(),
        c.utterances.len(),
        "no utterance lost or duplicated"
    );
    let secs: Vec<f64> = a
        .iter()
        .map(|cl| cl.iter().map(|e| e.duration_s()).sum())
        .collect();
    let (lo, hi) = secs
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), &s| (l.min(s), h.max(s)));
    let biggest_speaker = owner
        .keys()
        .map(|s| {
            c.utterances
                .iter()
                .filter(|u| u.speaker == *s)
                .map(|u| u.duration_s())
                .sum::<f64>()
        })
        .fold(0f64, f64::max);
    assert!(
        hi - lo <= biggest_speaker,
        "durations {secs:?} spread more than one speaker ({biggest_speaker} s)"
    );
}

#[test]
fn more_clients_than_speakers_is_a_clear_error() {
    let e = partition(&synthetic(3, 5), &cfg(Method::Speaker, 4, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 clients") && e.contains("3 speakers"), "{e}");
}

#[test]
fn iid_deals_evenly_and_seed_matters() {
    let c = synthetic(20, 10);
    let a = partition(&c, &cfg(Method::Iid, 8, 1)).unwrap();
    let sizes: Vec<usize> = a.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&s| s == 25), "{sizes:?}");
    let b = partition(&c, &cfg(Method::Iid, 8, 2)).unwrap();
    assert_ne!(a, b, "a different seed gives a different shuffle");
}

#[test]
fn dirichlet_skew_grows_as_alpha_shrinks() {
    let c = synthetic(30, 20);
    // Mean over clients of the share of the client's most common speaker.
    let skew = |alpha: f64| {
        let p = partition(&c, &cfg(Method::Dirichlet { alpha }, 10, 3)).unwrap();
        assert_eq!(p.iter().map(Vec::len).sum::<usize>(), 600);
        p.iter()
            .map(|cl| {
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                cl.iter()
                    .for_each(|e| *counts.entry(&e.speaker).or_default() += 1);
                *counts.values().max().unwrap() as f64 / cl.len() as f64
            })
            .sum::<f64>()
            / 10.0
    };
    let (low, high) = (skew(0.1), skew(100.0));
    assert!(
        low > 2.0 * high,
        "alpha 0.1 skew {low} vs alpha 100 skew {high}"
    );
    // With alpha large, speaker mixtures approach uniform: ~1/30 of each client per speaker.
    assert!(high < 0.15, "{high}");
    let same = partition(&c, &cfg(Method::Dirichlet { alpha: 0.5 }, 10, 3)).unwrap();
    assert_eq!(
        same,
        partition(&c, &cfg(Method::Dirichlet { alpha: 0.5 }, 10, 3)).unwrap()
    );
    let e = partition(&c, &cfg(Method::Dirichlet { alpha: -1.0 }, 10, 3)).unwrap_err();
    assert!(e.to_string().contains("alpha"), "{e}");
}

#[test]
fn train_valid_split_is_80_20_disjoint_and_seeded() {
    let c = synthetic(10, 10);
    let p = partition(&c, &cfg(Method::Speaker, 5, 11)).unwrap();
    for cl in &p {
        let valid: BTreeSet<&str> = cl
            .iter()
            .filter(|e| e.split == Split::Valid)
            .map(|e| e.id.as_str())
            .collect();
        let train = cl.iter().filter(|e| e.split == Split::Train).count();
        assert_eq!((train, valid.len()), (16, 4));
    }
    let q = partition(&c, &cfg(Method::Speaker, 5, 12)).unwrap();
    assert_ne!(p, q, "split is seeded");
}

#[test]
fn writes_manifests_and_partition_json_that_reload() {
    let c = sample();
    let conf = cfg(Method::Speaker, 10, 0);
    let p = partition(&c, &conf).unwrap();
    let out = tempfile::tempdir().unwrap();
    let s = write_partition(out.path(), &c, &p, &conf).unwrap();
    assert_eq!(s.clients.len(), 10);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("partition.json")).unwrap()).unwrap();
    assert_eq!(json["method"], "speaker");
    assert_eq!(json["clients"].as_array().unwrap().len(), 10);
    let m = Manifest::load(&out.path().join("client_3/manifest.csv")).unwrap();
    assert_eq!(m.entries, p[3]);
    assert!(
        m.abs_path(&m.entries[0]).is_file(),
        "paths resolve against the declared root"
    );
    let header = std::fs::read_to_string(out.path().join("client_3/manifest.csv")).unwrap();
    assert!(
        header.starts_with("id,path,split,num_samples,sample_rate,speaker,chapter,transcript"),
        "{header}"
    );
    // Re-partitioning into fewer clients leaves no stale client folder behind.
    let conf5 = cfg(Method::Speaker, 5, 0);
    write_partition(out.path(), &c, &partition(&c, &conf5).unwrap(), &conf5).unwrap();
    assert!(!out.path().join("client_5").exists());
    assert!(
        std::fs::read_dir(out.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp"))
    );
}

#[test]
fn unwritable_output_is_an_error_naming_the_path() {
    let c = sample();
    let conf = cfg(Method::Speaker, 2, 0);
    let p = partition(&c, &conf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let e = write_partition(&blocker.join("out"), &c, &p, &conf).unwrap_err();
    assert!(e.to_string().contains("file/out"), "{e}");
}

/// Found by `fedhubert-fuzz` (target partition): `num_samples` comes from a manifest, and one
/// speaker's total of 2^63-1 + 2^63+1 overflowed the u64 sum (a panic in debug builds, a wrapped,
/// wrong balance in release).
#[test]
fn huge_num_samples_do_not_overflow_the_speaker_balance() {
    let mut c = synthetic(3, 1);
    c.utterances.push(Entry {
        id: "0-0-9".into(),
        ..c.utterances[0].clone()
    });
    c.utterances[0].num_samples = (1 << 63) - 1;
    c.utterances.last_mut().unwrap().num_samples = (1 << 63) + 1;
    let clients = partition(&c, &cfg(Method::Speaker, 2, 0)).unwrap();
    // Speaker 0 outweighs the others together, so it sits alone on one client.
    let alone: Vec<_> = clients
        .iter()
        .filter(|k| k.iter().all(|e| e.speaker == "0"))
        .collect();
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0].len(), 2);
}

/// A Dirichlet partition with more clients than utterances cannot succeed; it is refused before
/// buffers are sized by the client count (2^40 clients asked for 24 TiB and aborted the process).
#[test]
fn dirichlet_with_more_clients_than_utterances_is_an_error() {
    let c = synthetic(2, 2);
    for n in [5, 1 << 40, usize::MAX] {
        let e = partition(&c, &cfg(Method::Dirichlet { alpha: 1.0 }, n, 0)).unwrap_err();
        assert!(e.to_string().contains("only 4 utterances"), "{e}");
    }
}
