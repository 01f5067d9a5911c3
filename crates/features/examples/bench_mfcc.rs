//! MFCC throughput on the bundled LibriSpeech sample, and agreement with torchaudio.
//!
//! ```text
//! cargo run --release -p fedhubert-features --example bench_mfcc -- [--threads N] [--repeat R]
//!     [--reference DIR]   # DIR from bench/mfcc_torchaudio.py --out DIR: reports max |ours - torchaudio|
//!     [--write DIR]       # our features as DIR/mfcc.npy + mfcc.len + ids.txt
//! ```
//!
//! Decoding is done once up front and excluded from the timing (as in bench/mfcc_torchaudio.py);
//! each repeat featurizes every utterance (MFCC + deltas + delta-deltas, 39 dims). With N > 1
//! utterances are spread over a rayon pool of N threads.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedhubert_features::shard::ShardReader;
use fedhubert_features::{MFCC_DIM, Mfcc};
use rayon::prelude::*;

fn flacs(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    let mut rd: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    rd.sort();
    for p in rd {
        if p.is_dir() {
            flacs(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "flac") {
            out.push((
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                p,
            ));
        }
    }
}

/// CPU seconds used by this process (all threads): robust to other load on the machine.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall filling a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let mut threads = 1usize;
    let mut repeat = 5usize;
    let mut reference: Option<PathBuf> = None;
    let mut write: Option<PathBuf> = None;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/librispeech-sample");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = val().parse().expect("--threads N"),
            "--repeat" => repeat = val().parse().expect("--repeat R"),
            "--reference" => reference = Some(PathBuf::from(val())),
            "--write" => write = Some(PathBuf::from(val())),
            "--bench" => {} // passed by `cargo bench`
            other => panic!(
                "unknown argument {other} (expected --threads N, --repeat R, --reference DIR, --write DIR)"
            ),
        }
    }
    let mut files = Vec::new();
    flacs(&root, &root, &mut files);
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let t = Instant::now();
    let audio: Vec<Vec<f32>> = files
        .iter()
        .map(|(_, p)| fedhubert_audio::load_audio(p).expect("decode").samples)
        .collect();
    let decode_s = t.elapsed().as_secs_f64();
    let seconds: f64 = audio.iter().map(|a| a.len() as f64 / 16_000.0).sum();
    println!(
        "{} utterances, {seconds:.1} s of audio (decode {decode_s:.3} s, not timed)",
        audio.len()
    );

    let mfcc = Mfcc::default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let run = || -> Vec<Vec<f32>> {
        if threads == 1 {
            let mut s = mfcc.scratch();
            audio
                .iter()
                .map(|a| {
                    let mut o = Vec::new();
                    mfcc.compute_into(a, &mut s, &mut o);
                    o
                })
                .collect()
        } else {
            pool.install(|| {
                audio
                    .par_iter()
                    .map_init(
                        || mfcc.scratch(),
                        |s, a| {
                            let mut o = Vec::new();
                            mfcc.compute_into(a, s, &mut o);
                            o
                        },
                    )
                    .collect()
            })
        }
    };
    let feats = run(); // warm-up
    let (mut times, mut cpu): (Vec<f64>, Vec<f64>) = (0..repeat)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_seconds());
            std::hint::black_box(run());
            (t.elapsed().as_secs_f64(), cpu_seconds() - c)
        })
        .unzip();
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let med_cpu = cpu[cpu.len() / 2];
    let frames: usize = feats.iter().map(|f| f.len() / MFCC_DIM).sum();
    println!(
        "rust mfcc39: threads {threads}, {repeat} repeats, median {:.4} s wall (min {:.4} s) per pass: \
         {:.1} utt/s, {:.0} s audio/s, {:.0} frames/s; median CPU {:.4} s per pass ({:.0} s audio per CPU s)",
        med,
        times[0],
        audio.len() as f64 / med,
        seconds / med,
        frames as f64 / med,
        med_cpu,
        seconds / med_cpu
    );

    if let Some(dir) = write {
        let mut w =
            fedhubert_features::shard::ShardWriter::<f32>::create(&dir, "mfcc", Some(MFCC_DIM))
                .unwrap();
        for f in &feats {
            w.push(f).unwrap();
        }
        w.finish().unwrap();
        let ids: String = files.iter().map(|(r, _)| format!("{r}\n")).collect();
        std::fs::write(dir.join("ids.txt"), ids).unwrap();
        println!("wrote our features to {}", dir.display());
    }

    if let Some(dir) = reference {
        let ids = std::fs::read_to_string(dir.join("ids.txt")).expect("reference ids.txt");
        let ids: Vec<&str> = ids.lines().collect();
        assert_eq!(
            ids.len(),
            files.len(),
            "reference has {} utterances",
            ids.len()
        );
        let r = ShardReader::<f32>::open(&dir, "mfcc").expect("reference shard");
        let want = r.read_all().unwrap();
        let (mut max, mut worst) = (0.0f32, String::new());
        for ((id, (rel, _)), (w, o)) in ids.iter().zip(&files).zip(want.iter().zip(&feats)) {
            assert_eq!(*id, rel, "reference order differs");
            assert_eq!(w.len(), o.len(), "{rel}: frame count differs");
            let d = w
                .iter()
                .zip(o)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            if d > max {
                (max, worst) = (d, rel.clone());
            }
        }
        println!(
            "max abs diff vs torchaudio over {} utterances ({frames} x 39 values): {max:.3e} ({worst})",
            ids.len()
        );
    }
}
