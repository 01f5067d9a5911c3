#![allow(clippy::needless_range_loop)]

use std::path::Path;

use fedhubert_features::shard::{ShardReader, ShardWriter};
use fedhubert_kmeans::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` points from `blobs` well-separated Gaussian blobs (centres on a grid 20 apart, sd 1).
fn blobs(n: usize, d: usize, nblobs: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000);
    let centres: Vec<Vec<f32>> = (0..nblobs)
        .map(|_| (0..d).map(|_| rng.random_range(-100.0..100.0f32)).collect())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(n * d);
    for _ in 0..n {
        let b = rng.random_range(0..nblobs);
        for f in 0..d {
            // sum of uniforms ~ roughly Gaussian, sd 1
            let g: f32 = (0..4).map(|_| rng.random_range(-1.0..1.0f32)).sum::<f32>() * 0.866;
            x.push(centres[b][f] + g);
        }
    }
    (x, centres)
}

fn nearest(c: &[f32], d: usize, p: &[f32]) -> (usize, f32) {
    (0..c.len() / d)
        .map(|j| {
            (
                j,
                (0..d).map(|f| (c[j * d + f] - p[f]).powi(2)).sum::<f32>(),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
}

/// Every blob centre has a codebook entry within `tol` (squared distance).
fn finds_all(cb: &Codebook, centres: &[Vec<f32>], tol: f32) -> bool {
    let mut hit = vec![false; cb.k];
    centres.iter().all(|c| {
        let (j, d2) = nearest(&cb.centroids, cb.dim, c);
        let fresh = !hit[j];
        hit[j] = true;
        d2 < tol && fresh
    })
}

fn small_cfg(k: usize, seed: u64) -> MiniBatchConfig {
    MiniBatchConfig {
        k,
        batch_size: 1000,
        max_iter: 20,
        n_init: 3,
        seed,
        ..Default::default()
    }
}

fn clients_from(parts: Vec<Vec<f32>>, d: usize) -> Vec<Box<dyn KmClient>> {
    parts
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            Box::new(InProcessClient::new(
                format!("client_{i}"),
                Box::new(InMemorySource::new(x, d).unwrap()),
            )) as Box<dyn KmClient>
        })
        .collect()
}

#[test]
fn kmeanspp_and_minibatch_find_all_blobs() {
    let (x, centres) = blobs(6000, 5, 12, 1);
    for seed in 0..5 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = kmeans_plusplus(&x, None, 5, 12, &mut rng);
        let cb = Codebook::new(12, 5, c).unwrap();
        // k-means++ seeds are data points: within ~4 sd of the blob centre.
        assert!(
            finds_all(&cb, &centres, 5.0 * 16.0),
            "seed {seed}: k-means++ missed a blob"
        );
        let src = InMemorySource::new(x.clone(), 5).unwrap();
        let fit = fit_minibatch(&src, &small_cfg(12, seed)).unwrap();
        assert!(
            finds_all(&fit.codebook, &centres, 0.1),
            "seed {seed}: mini-batch missed a blob"
        );
        // sd 1 per dim => mean inertia ~ d = 5
        let mean = fit.inertia / fit.n_frames as f64;
        assert!((mean - 5.0).abs() < 0.5, "mean inertia {mean}");
    }
}

#[test]
fn deterministic_and_thread_independent() {
    let (x, _) = blobs(5000, 7, 9, 2);
    let src = InMemorySource::new(x.clone(), 7).unwrap();
    let a = with_threads(Some(1), || fit_minibatch(&src, &small_cfg(9, 42)))
        .unwrap()
        .unwrap();
    let b = with_threads(Some(2), || fit_minibatch(&src, &small_cfg(9, 42)))
        .unwrap()
        .unwrap();
    let c = fit_minibatch(&src, &small_cfg(9, 43)).unwrap();
    assert_eq!(a.codebook, b.codebook);
    assert_eq!(a.codebook.assign(&x).0, b.codebook.assign(&x).0);
    assert_eq!(a.inertia, b.inertia);
    assert_ne!(
        a.codebook, c.codebook,
        "another seed should give another fit"
    );

    let parts: Vec<Vec<f32>> = x.chunks(1000 * 7).map(|c| c.to_vec()).collect();
    let cfg = FederatedConfig {
        k: 9,
        seed: 5,
        ..Default::default()
    };
    let f1 = with_threads(Some(1), || {
        fit_federated(&clients_from(parts.clone(), 7), &cfg)
    })
    .unwrap()
    .unwrap();
    let f2 = with_threads(Some(2), || {
        fit_federated(&clients_from(parts.clone(), 7), &cfg)
    })
    .unwrap()
    .unwrap();
    assert_eq!(f1.codebook, f2.codebook);
    assert_eq!(f1.inertia, f2.inertia);
}

#[test]
fn shard_source_equals_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = blobs(3000, 4, 6, 3);
    let mut w = ShardWriter::<f32>::create(dir.path(), "mfcc", Some(4)).unwrap();
    let mut off = 0;
    for (i, len) in [100usize, 37, 500, 1].iter().cycle().enumerate() {
        let len = (*len).min(3000 - off);
        if len == 0 || i > 1000 {
            break;
        }
        w.push(&x[off * 4..(off + len) * 4]).unwrap();
        off += len;
    }
    w.finish().unwrap();
    let sh = ShardSource::open(dir.path(), "mfcc").unwrap();
    let mem = InMemorySource::new(x, 4).unwrap();
    let a = fit_minibatch(&sh, &small_cfg(6, 7)).unwrap();
    let b = fit_minibatch(&mem, &small_cfg(6, 7)).unwrap();
    assert_eq!(a.codebook, b.codebook);
    assert_eq!(a.inertia, b.inertia);
}

/// With one client, a federated Lloyd round is exactly a central Lloyd iteration: same init and
/// same number of iterations give the same centroids (both sum in f64 in frame order); the full
/// federated pipeline lands within 2% of the central mini-batch inertia.
#[test]
fn federated_equals_central_on_one_client() {
    let (x, _) = blobs(4000, 6, 10, 4);
    let d = 6;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let init = kmeans_plusplus(&x, None, d, 10, &mut rng);
    let mut central = init.clone();
    weighted_lloyd(&x, None, d, &mut central, 5);
    let cfg = FederatedConfig {
        k: 10,
        rounds: 5,
        tol: -1.0,
        ..Default::default()
    };
    let fed = fit_federated_from(
        &clients_from(vec![x.clone()], d),
        &cfg,
        Codebook::new(10, d, init).unwrap(),
    )
    .unwrap();
    assert_eq!(fed.rounds, 5);
    let maxdiff = fed
        .codebook
        .centroids
        .iter()
        .zip(&central)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        maxdiff <= 1e-6,
        "max |federated - central Lloyd| = {maxdiff}"
    );

    let src = InMemorySource::new(x.clone(), d).unwrap();
    let mb = fit_minibatch(&src, &small_cfg(10, 0)).unwrap();
    let ff = fit_federated(
        &clients_from(vec![x], d),
        &FederatedConfig {
            k: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let rel = ff.inertia / mb.inertia - 1.0;
    eprintln!(
        "one client: federated {:.1} central {:.1} ({:+.3}%)",
        ff.inertia,
        mb.inertia,
        rel * 100.0
    );
    assert!(rel.abs() < 0.02, "federated vs central {rel}");
}

#[test]
fn federated_close_to_central_on_many_clients() {
    // Non-IID: each client sees its own subset of blobs.
    let d = 8;
    let (x, centres) = blobs(12000, d, 16, 5);
    let mut parts = vec![Vec::new(); 4];
    for r in x.chunks(d) {
        let (b, _) = nearest(&centres.concat(), d, r);
        parts[b % 4].extend_from_slice(r); // client c holds blobs b = c mod 4
    }
    let src = InMemorySource::new(x.clone(), d).unwrap();
    let central = fit_minibatch(&src, &small_cfg(16, 1)).unwrap();
    for update in [ServerUpdate::Lloyd, ServerUpdate::MiniBatch] {
        let cfg = FederatedConfig {
            k: 16,
            update,
            ..Default::default()
        };
        let fed = fit_federated(&clients_from(parts.clone(), d), &cfg).unwrap();
        let rel = fed.inertia / central.inertia - 1.0;
        eprintln!(
            "{update:?}: federated {:.1} central {:.1} ({:+.3}%), rounds {}",
            fed.inertia,
            central.inertia,
            rel * 100.0,
            fed.rounds
        );
        assert!(rel < 0.02, "{update:?}: {rel}");
        assert!(finds_all(&fed.codebook, &centres, 0.1));
    }
}

#[test]
fn empty_clusters_are_split() {
    let d = 3;
    let (x, centres) = blobs(3000, d, 5, 6);
    // Init: 4 centres on 4 blobs + one far away that no frame is closest to; blob 4 is uncovered.
    let mut init: Vec<f32> = centres[..4].concat();
    init.extend_from_slice(&[1e4, 1e4, 1e4]);
    let cfg = FederatedConfig {
        k: 5,
        ..Default::default()
    };
    let fed = fit_federated_from(
        &clients_from(vec![x[..1500 * d].to_vec(), x[1500 * d..].to_vec()], d),
        &cfg,
        Codebook::new(5, d, init).unwrap(),
    )
    .unwrap();
    assert!(
        fed.history[0].splits == 1,
        "round 0 should split once: {:?}",
        fed.history[0]
    );
    assert!(fed.counts.iter().all(|&c| c > 0), "{:?}", fed.counts);
    assert!(
        finds_all(&fed.codebook, &centres, 0.1),
        "the split centre should move to the uncovered blob"
    );

    // Direct check of the split rule: donor at mean -/+ sqrt(2/pi) sd along its widest dimension.
    let mut agg = ClientStats::zeros(2, 2);
    // cluster 0: frames (0,0) (0,0) (0,4) (0,-4): variance 8 along dim 1, 0 along dim 0; cluster 1 empty.
    for v in [[0.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, -4.0]] {
        agg.counts[0] += 1;
        for f in 0..2 {
            agg.sums[f] += v[f];
            agg.sumsq[f] += v[f] * v[f];
        }
    }
    let mut c = vec![0.0, 0.0, 9.0, 9.0];
    assert_eq!(split_empty(&mut c, &agg, 2), 1);
    let delta = (2.0 / std::f32::consts::PI).sqrt() * 8f32.sqrt();
    let want = [0.0, -delta, 0.0, delta];
    assert!(
        c.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{c:?} vs {want:?}"
    );
}

/// A client that stops answering after `fail_from` rounds.
struct Flaky {
    inner: InProcessClient,
    fail_from: usize,
}

impl KmClient for Flaky {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn n_frames(&self) -> usize {
        self.inner.n_frames()
    }
    fn init_summary(&self, k: usize, seed: u64) -> fedhubert_kmeans::Result<LocalSummary> {
        self.inner.init_summary(k, seed)
    }
    fn stats(&self, round: usize, cb: &Codebook) -> fedhubert_kmeans::Result<ClientStats> {
        if round >= self.fail_from {
            return Err(KmError::Client {
                client: self.name(),
                why: "connection lost".into(),
            });
        }
        self.inner.stats(round, cb)
    }
}

#[test]
fn client_dropout_mid_fit() {
    let d = 5;
    let (x, centres) = blobs(8000, d, 10, 7);
    let parts: Vec<Vec<f32>> = x.chunks(2000 * d).map(|c| c.to_vec()).collect();
    let cfg = FederatedConfig {
        k: 10,
        seed: 3,
        ..Default::default()
    };
    let full = fit_federated(&clients_from(parts.clone(), d), &cfg).unwrap();
    let mut flaky = clients_from(parts.clone(), d);
    let victim = flaky.remove(2);
    drop(victim);
    flaky.insert(
        2,
        Box::new(Flaky {
            inner: InProcessClient::new(
                "client_2",
                Box::new(InMemorySource::new(parts[2].clone(), d).unwrap()),
            ),
            fail_from: 2,
        }),
    );
    let fit = fit_federated(&flaky, &cfg).unwrap();
    assert_eq!(fit.dropouts, vec!["client_2".to_string()]);
    assert_eq!(fit.history[0].replied, 4);
    assert!(fit.history.iter().skip(2).all(|h| h.replied == 3));
    assert_eq!(
        fit.n_frames, 6000,
        "evaluation covers the clients that replied"
    );
    // On all data (including the dropped client's), the codebook is as good as the full fit.
    let src = InMemorySource::new(x, d).unwrap();
    let (a, b) = (
        evaluate(&src, &fit.codebook).unwrap().inertia,
        evaluate(&src, &full.codebook).unwrap().inertia,
    );
    eprintln!(
        "dropout: {a:.1} vs no dropout {b:.1} ({:+.3}%)",
        (a / b - 1.0) * 100.0
    );
    assert!(a / b - 1.0 < 0.02);
    assert!(finds_all(&fit.codebook, &centres, 0.1));
}

fn write_client(dir: &Path, x: &[f32], d: usize, lens: &[usize]) {
    let mut w = ShardWriter::<f32>::create(dir, "mfcc", Some(d)).unwrap();
    let mut off = 0;
    for &l in lens {
        w.push(&x[off * d..(off + l) * d]).unwrap();
        off += l;
    }
    assert_eq!(off * d, x.len());
    w.finish().unwrap();
    // Synthetic features, recorded as `fedhubert features` records real ones.
    fedhubert_io::provenance::Provenance::new("features", "test")
        .param("frame_rate", 100.0)
        .write_for_shard(dir, "mfcc")
        .unwrap();
}

#[test]
fn labels_align_with_frames() {
    let dir = tempfile::tempdir().unwrap();
    let d = 4;
    let (x, _) = blobs(1234, d, 5, 8);
    let lens = [300, 1, 0, 433, 500];
    write_client(dir.path(), &x, d, &lens);
    let src = ShardSource::open(dir.path(), "mfcc").unwrap();
    let fit = fit_minibatch(&src, &small_cfg(5, 0)).unwrap();
    let rep = label_client(dir.path(), "mfcc", &fit.codebook, Some("km"), None).unwrap();
    assert_eq!(rep.frames, 1234);
    assert_eq!(rep.utterances, lens.len());
    assert!((rep.inertia - fit.inertia).abs() < 1e-6 * fit.inertia);
    let r = ShardReader::<u16>::open(dir.path(), "km").unwrap();
    assert_eq!(r.lengths(), &lens);
    let labels: Vec<u16> = r.read_all().unwrap().concat();
    let expect: Vec<u16> = fit
        .codebook
        .assign(&x)
        .0
        .iter()
        .map(|&l| l as u16)
        .collect();
    assert_eq!(labels, expect);
}

#[test]
fn agreement_local_low_federated_one() {
    let d = 6;
    let k = 16;
    let (x, _) = blobs(16000, d, k, 9);
    let parts: Vec<Vec<f32>> = x.chunks(4000 * d).map(|c| c.to_vec()).collect();
    let fed = fit_federated(
        &clients_from(parts.clone(), d),
        &FederatedConfig {
            k,
            ..Default::default()
        },
    )
    .unwrap();
    let mut local = Vec::new();
    let mut global = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let src = InMemorySource::new(p.clone(), d).unwrap();
        let lf = fit_minibatch(&src, &small_cfg(k, i as u64)).unwrap();
        let (gl, _) = fed.codebook.assign(p);
        let (ll, _) = lf.codebook.assign(p);
        let mut cl = Contingency::new(k, k);
        let mut cg = Contingency::new(k, k);
        for (a, b) in ll.iter().zip(&gl) {
            cl.add(*a, *b);
            cg.add(*b, *b);
        }
        local.push((format!("client_{i}"), cl.agreement()));
        global.push((format!("client_{i}"), cg.agreement()));
    }
    let (l, g) = (Agreement::pool(local), Agreement::pool(global));
    eprintln!(
        "local: purity {:.3} identity {:.3} raw {:.3}",
        l.purity, l.identity_agreement, l.raw_agreement
    );
    assert!(
        l.purity > 0.99,
        "local codebooks are relabellings of the global one on blobs"
    );
    assert!(
        l.identity_agreement < 0.4,
        "local ids should not mean the same thing: {}",
        l.identity_agreement
    );
    assert_eq!(g.identity_agreement, 1.0);
    assert_eq!(g.purity, 1.0);
}

#[test]
fn codebook_roundtrip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cb = Codebook::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
    let meta = CodebookMeta {
        mode: "federated".into(),
        seed: 7,
        inertia: 12.5,
        n_frames: 99,
    };
    let p = dir.path().join("cb.safetensors");
    cb.save(&p, &meta).unwrap();
    let (cb2, meta2) = Codebook::load(&p).unwrap();
    assert_eq!(cb, cb2);
    assert_eq!(meta, meta2);
    let src = InMemorySource::new(vec![0.0; 3 * 4], 3).unwrap();
    let err = fit_minibatch(&src, &small_cfg(5, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only 4 frames"), "{err}");
    let clients: Vec<Box<dyn KmClient>> = vec![
        Box::new(InProcessClient::new(
            "a",
            Box::new(InMemorySource::new(vec![0.0; 30], 3).unwrap()),
        )),
        Box::new(InProcessClient::new(
            "b",
            Box::new(InMemorySource::new(vec![0.0; 30], 5).unwrap()),
        )),
    ];
    let err = fit_federated(
        &clients,
        &FederatedConfig {
            k: 2,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("client b"), "{err}");
}

/// `--percent`: a fixed fraction of whole utterances, the same draw at the same seed, and the
/// rows it serves are exactly those utterances' rows.
#[test]
fn sampled_source_keeps_whole_utterances() {
    let dir = tempfile::tempdir().unwrap();
    let d = 3;
    let lens = [5usize, 0, 7, 2, 9, 4, 6, 1, 8, 3];
    let total: usize = lens.iter().sum();
    let x: Vec<f32> = (0..total * d).map(|v| v as f32).collect();
    let mut w = ShardWriter::<f32>::create(dir.path(), "mfcc", Some(d)).unwrap();
    let mut off = 0;
    for &len in &lens {
        w.push(&x[off * d..(off + len) * d]).unwrap();
        off += len;
    }
    w.finish().unwrap();
    let open = || ShardSource::open(dir.path(), "mfcc").unwrap();
    let s = SampledSource::new(open(), 0.3, 7).unwrap();
    assert_eq!(s.utterances(), 3, "ceil(10 * 0.3)");
    let mut seen = Vec::new();
    s.for_each_chunk(&mut |start, rows| {
        assert_eq!(start, seen.len() / d);
        seen.extend_from_slice(rows);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), s.n_frames() * d);
    let mut gathered = Vec::new();
    s.gather(&(0..s.n_frames()).rev().collect::<Vec<_>>(), &mut gathered)
        .unwrap();
    let reversed: Vec<f32> = seen.chunks(d).rev().flatten().copied().collect();
    assert_eq!(gathered, reversed);
    // Every served row is a row of the shard, and every kept utterance whole.
    let firsts: Vec<usize> = lens
        .iter()
        .scan(0, |r, &l| {
            let f = *r;
            *r += l;
            Some(f)
        })
        .collect();
    let kept: Vec<usize> = (0..lens.len())
        .filter(|&u| lens[u] > 0 && seen.chunks(d).any(|row| row[0] as usize == firsts[u] * d))
        .collect();
    assert_eq!(kept.iter().map(|&u| lens[u]).sum::<usize>(), s.n_frames());
    let again = SampledSource::new(open(), 0.3, 7).unwrap();
    assert_eq!(again.n_frames(), s.n_frames());
    assert_eq!(
        SampledSource::new(open(), 1.0, 0).unwrap().n_frames(),
        total
    );
    assert!(SampledSource::new(open(), 0.0, 0).is_err());
}
