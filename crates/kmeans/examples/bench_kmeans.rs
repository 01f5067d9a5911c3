//! Benchmark: `cargo run --release -p fedhubert-kmeans --example bench_kmeans -- FRAMES.npy [--k 100]
//! [--threads N] [--clients C] [--seed S] [--n-init 20]`.
//!
//! Loads a float32 `[n, d]` `.npy`, fits central mini-batch k-means with sklearn's settings
//! (fairseq's recipe) and prints time and inertia (sum of squared distances over all frames). With
//! `--clients C > 0` it also splits the frames into C contiguous clients and fits federated k-means.

use std::time::Instant;

use fedhubert_kmeans::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: bench_kmeans FRAMES.npy [--k K] [--threads N] [--clients C] [--seed S] [--n-init N]")?;
    let (mut k, mut threads, mut clients, mut seed, mut n_init) =
        (100usize, None, 0usize, 0u64, 20usize);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--k" => k = v.parse()?,
            "--threads" => threads = Some(v.parse()?),
            "--clients" => clients = v.parse()?,
            "--seed" => seed = v.parse()?,
            "--n-init" => n_init = v.parse()?,
            _ => return Err(format!("unknown flag {a}").into()),
        }
    }
    let src = InMemorySource::from_npy(std::path::Path::new(&path))?;
    let (n, d) = (src.n_frames(), src.dim());
    println!(
        "data: {path} n={n} d={d} k={k} threads={}",
        threads.map_or("all".to_string(), |t: usize| t.to_string())
    );
    let cfg = MiniBatchConfig {
        k,
        seed,
        n_init,
        ..Default::default()
    };
    let t = Instant::now();
    let fit = with_threads(threads, || fit_minibatch(&src, &cfg))??;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "central  time_s={secs:.3} inertia={:.6e} mean={:.4} n_steps={} n_iter={} empty={}",
        fit.inertia,
        fit.inertia / n as f64,
        fit.n_steps,
        fit.n_iter,
        fit.counts.iter().filter(|&&c| c == 0).count()
    );
    if clients > 0 {
        let per = n.div_ceil(clients);
        let cl: Vec<Box<dyn KmClient>> = src
            .data()
            .chunks(per * d)
            .enumerate()
            .map(|(i, c)| {
                Box::new(InProcessClient::new(
                    format!("client_{i}"),
                    Box::new(InMemorySource::new(c.to_vec(), d).unwrap()),
                )) as Box<dyn KmClient>
            })
            .collect();
        let fcfg = FederatedConfig {
            k,
            seed,
            ..Default::default()
        };
        let t = Instant::now();
        let ff = with_threads(threads, || fit_federated(&cl, &fcfg))??;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "federated time_s={secs:.3} inertia={:.6e} mean={:.4} rounds={} clients={} vs_central={:+.3}%",
            ff.inertia,
            ff.inertia / n as f64,
            ff.rounds,
            cl.len(),
            (ff.inertia / fit.inertia - 1.0) * 100.0
        );
    }
    Ok(())
}
