//! Builds a real partition of the bundled LibriSpeech sample with MFCC features and k-means labels.

use std::path::{Path, PathBuf};

use fedhubert_audio::Manifest;
use fedhubert_audio::partition::{Method, PartitionConfig, partition, write_partition};
use fedhubert_audio::scan::scan_dir;
use fedhubert_features::{ExtractOptions, extract_manifest};
use fedhubert_kmeans::{
    ConcatSource, FrameSource, MiniBatchConfig, ShardSource, fit_minibatch, label_client,
};

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// `n` speaker clients with mfcc + `km` labels (k classes) in `out`; returns the client folders.
pub fn labelled_partition(out: &Path, n: usize, k: usize) -> Vec<PathBuf> {
    labelled_partition_of(&assets().join("librispeech-sample"), out, n, k)
}

/// As [`labelled_partition`], of the audio under `root`.
pub fn labelled_partition_of(root: &Path, out: &Path, n: usize, k: usize) -> Vec<PathBuf> {
    let corpus = scan_dir(root, false).unwrap();
    let cfg = PartitionConfig {
        method: Method::Speaker,
        num_clients: n,
        seed: 0,
        valid_fraction: 0.2,
        min_client_utterances: 2,
    };
    let clients = partition(&corpus, &cfg).unwrap();
    write_partition(out, &corpus, &clients, &cfg).unwrap();
    let dirs: Vec<PathBuf> = (0..n).map(|c| out.join(format!("client_{c}"))).collect();
    for d in &dirs {
        let mpath = d.join("manifest.csv");
        let m = Manifest::load(&mpath).unwrap();
        extract_manifest(&m, &mpath, d, &ExtractOptions::default(), &mut |_| {}).unwrap();
    }
    let sources: Vec<Box<dyn FrameSource>> = dirs
        .iter()
        .map(|d| Box::new(ShardSource::open(d, "mfcc").unwrap()) as Box<dyn FrameSource>)
        .collect();
    let all = ConcatSource::new(sources).unwrap();
    let fit = fit_minibatch(
        &all,
        &MiniBatchConfig {
            k,
            batch_size: 4000,
            max_iter: 5,
            n_init: 1,
            seed: 0,
            ..Default::default()
        },
    )
    .unwrap();
    for d in &dirs {
        label_client(d, "mfcc", &fit.codebook, Some("km"), None).unwrap();
    }
    dirs
}
