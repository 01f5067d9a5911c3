//! `fedhubert bench`: times the student and teacher (HuBERT Base) forward and training step,
//! MFCC extraction and FedAvg aggregation on synthetic input, and writes a JSON report
//! (`bench/pytorch_reference.py` measures the same models in PyTorch; see BENCHMARKS.md).
//!
//! Peak memory is the process's peak resident set (VmHWM), reset before each case through
//! `/proc/self/clear_refs`, so each case reports its own peak; the Python side does the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use fedhubert_fl::{FitRes, StrategyConfig};
use fedhubert_model::{HubertConfig, HubertForPretraining, HubertModel, PretrainConfig};
use fedhubert_train::data::{BatchConfig, Utt};
use fedhubert_train::trainer::{LocalTrainer, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::json_pretty;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads of the compute pool (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::common::parse_threads)]
    pub threads: usize,
    /// Utterances per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Seconds of 16 kHz audio per utterance.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Timed repetitions per case (the median is reported), after `--warmup` untimed ones.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Cases to run, comma separated: student-forward, student-step, student-step-frozen,
    /// teacher-forward, teacher-step, mfcc, aggregate, aggregate-dp (the same through DP-FedAvg).
    #[arg(
        long,
        default_value = "student-forward,student-step,student-step-frozen,teacher-forward,mfcc,aggregate"
    )]
    pub cases: String,
    /// JSON report path.
    #[arg(long, default_value = "runs/bench/bench.json")]
    pub out: PathBuf,
    /// A `bench/pytorch_reference.py` JSON report: print our time over PyTorch's per case.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Run every case in this process (by default each case runs in a child process, so that
    /// its peak memory is its own and not what earlier cases left in the allocator).
    #[arg(long)]
    pub in_process: bool,
}

const SAMPLE_RATE: f64 = 16_000.0;

/// The benchmark's model configs: the presets with LayerDrop off, so every step runs every layer
/// (the PyTorch side does the same).
fn bench_config(name: &str) -> HubertConfig {
    let cfg = match name {
        "student" => HubertConfig::student(),
        _ => HubertConfig::base(),
    };
    HubertConfig {
        layerdrop: 0.0,
        ..cfg
    }
}

/// Forward FLOPs (2 per multiply-add) of the encoder on `batch` utterances of `samples` samples:
/// conv front-end, feature projection, positional conv, transformer layers. The same formula is
/// in `bench/pytorch_reference.py`.
pub fn forward_flops(cfg: &HubertConfig, batch: usize, samples: usize) -> f64 {
    let b = batch as f64;
    let mut t = samples;
    let mut c_in = 1;
    let mut f = 0.0;
    for i in 0..cfg.conv_dim.len() {
        t = (t - cfg.conv_kernel[i]) / cfg.conv_stride[i] + 1;
        f += 2.0 * b * (cfg.conv_dim[i] * c_in * cfg.conv_kernel[i] * t) as f64;
        c_in = cfg.conv_dim[i];
    }
    let (t, h, ff) = (
        t as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
    );
    let n = b * t;
    f += 2.0 * n * c_in as f64 * h;
    f += 2.0
        * n
        * h
        * (h / cfg.num_conv_pos_embedding_groups as f64)
        * cfg.num_conv_pos_embeddings as f64;
    let layer = 2.0 * n * 4.0 * h * h + 2.0 * 2.0 * b * t * t * h + 2.0 * 2.0 * n * h * ff;
    f + cfg.num_hidden_layers as f64 * layer
}

/// Training-step FLOPs: forward plus the cosine head, backward counted as twice the forward
/// (the frozen case subtracts the front-end's backward itself).
pub fn step_flops(cfg: &HubertConfig, p: &PretrainConfig, batch: usize, samples: usize) -> f64 {
    let fwd = forward_flops(cfg, batch, samples);
    let t = cfg.num_frames(samples) as f64;
    let n = batch as f64 * t;
    let head = 2.0 * n * cfg.hidden_size as f64 * p.final_dim as f64
        + 2.0 * n * p.final_dim as f64 * p.num_classes as f64;
    3.0 * (fwd + head)
}

fn front_end_flops(cfg: &HubertConfig, batch: usize, samples: usize) -> f64 {
    let mut t = samples;
    let mut c_in = 1;
    let mut f = 0.0;
    for i in 0..cfg.conv_dim.len() {
        t = (t - cfg.conv_kernel[i]) / cfg.conv_stride[i] + 1;
        f += 2.0 * batch as f64 * (cfg.conv_dim[i] * c_in * cfg.conv_kernel[i] * t) as f64;
        c_in = cfg.conv_dim[i];
    }
    f
}

/// Peak resident set since the last [`reset_peak`], in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") / 1024.0
}

fn rss_mib() -> f64 {
    status_kib("VmRSS:") / 1024.0
}

fn status_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Resets VmHWM to the current RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Process CPU time (user + system) in seconds, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One case's measurements.
struct Timing {
    median_s: f64,
    min_s: f64,
    times: Vec<f64>,
    cpu_s: f64,
    peak: f64,
    before: f64,
}

/// Times `f` (`warmup` untimed calls, then `repeat` timed ones) and measures its peak RSS and
/// its CPU time per call (the steadier figure when other processes share the cores).
fn time_case(warmup: usize, repeat: usize, mut f: impl FnMut()) -> Timing {
    let before = rss_mib();
    reset_peak();
    for _ in 0..warmup {
        f();
    }
    let mut times = Vec::with_capacity(repeat);
    let c0 = cpu_seconds();
    for _ in 0..repeat {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64());
    }
    let cpu_s = (cpu_seconds() - c0) / repeat as f64;
    let peak = peak_rss_mib();
    let mut sorted = times.clone();
    let median_s = median(&mut sorted);
    Timing {
        median_s,
        min_s: sorted[0],
        times,
        cpu_s,
        peak,
        before,
    }
}

fn synthetic_wavs(batch: usize, samples: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..batch)
        .map(|_| {
            (0..samples)
                .map(|i| {
                    let tone = (i as f32 * 0.0628).sin() * 0.3;
                    tone + (rng.random::<f32>() - 0.5) * 0.2
                })
                .collect()
        })
        .collect()
}

fn wav_tensor(wavs: &[Vec<f32>], device: &burn::tensor::Device) -> Tensor<2> {
    let (b, s) = (wavs.len(), wavs[0].len());
    let flat: Vec<f32> = wavs.iter().flat_map(|w| w.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), device)
}

/// One case's figures in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    pub median_s: f64,
    pub min_s: f64,
    pub times_s: Vec<f64>,
    pub cpu_s_per_call: f64,
    pub audio_s_per_s: f64,
    pub gflop: f64,
    pub gflop_per_s: f64,
    pub gflop_per_s_at_min: f64,
    pub peak_rss_mib: f64,
    pub rss_before_mib: f64,
}

/// Our time (and memory) over PyTorch's for one case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratios {
    pub median_ratio: f64,
    pub min_ratio: f64,
    pub cpu_ratio: f64,
    pub peak_rss_ratio: f64,
}

/// The JSON report (`--out`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub side: String,
    pub threads: usize,
    pub batch: usize,
    pub seconds: f64,
    pub repeat: usize,
    pub warmup: usize,
    pub cases: BTreeMap<String, CaseResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_pytorch: Option<BTreeMap<String, Ratios>>,
    /// The `--reference` report as it was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pytorch: Option<Value>,
}

struct Ctx<'a> {
    args: &'a Args,
    samples: usize,
    audio_s: f64,
    results: BTreeMap<String, CaseResult>,
}

impl Ctx<'_> {
    fn record(&mut self, name: &str, t: Timing, flops: f64) {
        let secs = t.median_s;
        let gflops = if flops > 0.0 { flops / secs / 1e9 } else { 0.0 };
        eprintln!(
            "{name:<22} {secs:>8.4} s (min {:.4}, CPU {:.3} s)  {:>8.2} s audio/s  {gflops:>7.1} GFLOP/s  peak RSS {:>7.1} MiB (+{:.1})",
            t.min_s,
            t.cpu_s,
            self.audio_s / secs,
            t.peak,
            t.peak - t.before
        );
        self.results.insert(
            name.to_string(),
            CaseResult {
                median_s: secs,
                min_s: t.min_s,
                times_s: t.times,
                cpu_s_per_call: t.cpu_s,
                audio_s_per_s: self.audio_s / secs,
                gflop: flops / 1e9,
                gflop_per_s: gflops,
                gflop_per_s_at_min: if flops > 0.0 {
                    flops / t.min_s / 1e9
                } else {
                    0.0
                },
                peak_rss_mib: t.peak,
                rss_before_mib: t.before,
            },
        );
    }

    fn forward(&mut self, name: &str, which: &str) -> anyhow::Result<()> {
        let cfg = bench_config(which);
        let device = fedhubert_model::cpu_device();
        let model = HubertModel::new(&cfg, 0, &device)?.valid();
        let x = wav_tensor(&synthetic_wavs(self.args.batch, self.samples, 1), &device);
        let mut err = None;
        let t = time_case(self.args.warmup, self.args.repeat, || {
            match model.forward(x.clone(), None, None) {
                Ok(out) => {
                    let _ = out.last_hidden_state.into_data();
                }
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        let flops = forward_flops(&cfg, self.args.batch, self.samples);
        self.record(name, t, flops);
        Ok(())
    }

    fn step(&mut self, name: &str, which: &str, frozen: bool) -> anyhow::Result<()> {
        let cfg = bench_config(which);
        let pcfg = PretrainConfig::default();
        let device = fedhubert_model::cpu_device();
        let model = HubertForPretraining::new(&cfg, &pcfg, 0, &device)?;
        let tcfg = TrainConfig {
            freeze_feature_extractor: frozen,
            batch: BatchConfig {
                batch_size: self.args.batch,
                max_tokens: usize::MAX,
                max_sample_size: self.samples,
                min_sample_size: self.samples,
            },
            ..TrainConfig::default()
        };
        let mut trainer = LocalTrainer::new(model, tcfg, &device)?;
        let frames = (self.samples as f64 * pcfg.label_rate / SAMPLE_RATE).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let utts: Vec<Utt> = synthetic_wavs(self.args.batch, self.samples, 3)
            .into_iter()
            .enumerate()
            .map(|(i, wav)| Utt {
                id: format!("u{i}"),
                wav,
                labels: (0..frames)
                    .map(|_| rng.random_range(0..pcfg.num_classes as u32))
                    .collect(),
            })
            .collect();
        let micro = vec![utts.iter().collect::<Vec<_>>()];
        let mut k = 0u64;
        let mut err = None;
        let t = time_case(self.args.warmup, self.args.repeat, || {
            k += 1;
            if let Err(e) = trainer.step(&micro, 1e-5, k, None) {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        let mut flops = step_flops(&cfg, &pcfg, self.args.batch, self.samples);
        if frozen {
            // The front-end runs forward only.
            flops -= 2.0 * front_end_flops(&cfg, self.args.batch, self.samples);
        }
        self.record(name, t, flops);
        Ok(())
    }

    fn mfcc(&mut self) -> anyhow::Result<()> {
        let wavs = synthetic_wavs(self.args.batch, self.samples, 4);
        let mfcc = fedhubert_features::Mfcc::default();
        let t = time_case(self.args.warmup, self.args.repeat.max(20), || {
            for w in &wavs {
                std::hint::black_box(mfcc.compute(w));
            }
        });
        self.record("mfcc", t, 0.0);
        Ok(())
    }

    /// FedAvg of 10 clients' student weights (the server's per-round work); with `dp`, the
    /// same through DP-FedAvg (central noise from the OS generator, every update re-clipped on
    /// the server: the replies are 0.01 off the global in every weight, norm about 33 > C = 1).
    fn aggregate(&mut self, name: &str, dp: bool) -> anyhow::Result<()> {
        let cfg = bench_config("student");
        let model = HubertForPretraining::new(
            &cfg,
            &PretrainConfig::default(),
            0,
            &fedhubert_model::cpu_device(),
        )?;
        let w = fedhubert_model::collect_tensors(&model);
        let params: usize = w.tensors.iter().map(|t| t.data.len()).sum();
        let clients = 10;
        let mut reply = w.clone();
        reply.iter_data_mut().for_each(|x| *x += 0.01);
        let replies: Vec<_> = (0..clients).map(|_| reply.clone()).collect();
        let privacy = fedhubert_fl::PrivacyConfig {
            mode: fedhubert_fl::PrivacyMode::Central,
            noise_multiplier: Some(1.0),
            delta: 1e-3,
            sampling: fedhubert_fl::privacy::Sampling::Fixed,
            ..Default::default()
        };
        let plan = fedhubert_fl::privacy::DpPlan::new(&privacy, clients, 1.0, clients, 1)
            .map_err(anyhow::Error::msg)?;
        let strategy = || -> anyhow::Result<Box<dyn fedhubert_fl::Strategy>> {
            let s = StrategyConfig::default().build()?;
            Ok(match dp {
                true => Box::new(fedhubert_fl::privacy::DpFedAvg::new(
                    s,
                    privacy.clone(),
                    plan.clone(),
                    0,
                )?),
                false => s,
            })
        };
        let mut err = None;
        let t = time_case(self.args.warmup, self.args.repeat.max(10), || {
            let run = || -> anyhow::Result<()> {
                let mut s = strategy()?;
                s.begin_round(1, &w)?;
                for (i, r) in replies.iter().enumerate() {
                    s.accumulate(FitRes {
                        client: i,
                        weights: r.clone(),
                        num_examples: 100 + i as u64,
                        metrics: Default::default(),
                    })?;
                }
                std::hint::black_box(s.end_round()?);
                Ok(())
            };
            if let Err(e) = run() {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        eprintln!(
            "{:<22} {clients} clients x {:.1} M parameters: {:.2} GB/s of client weights",
            "",
            params as f64 / 1e6,
            (clients * params * 4) as f64 / t.median_s / 1e9
        );
        if dp {
            // A client's own share of the cost: one norm pass and one scaling pass.
            let clip = fedhubert_fl::privacy::ClientPrivacy {
                clipping_norm: 1.0,
                local_noise_std: None,
                noise: fedhubert_fl::privacy::NoiseSource::Os,
            };
            let c = time_case(self.args.warmup, self.args.repeat.max(10), || {
                let mut r = reply.clone();
                std::hint::black_box(fedhubert_fl::privacy::clip_update(&mut r, &w, &clip, 0));
            });
            eprintln!(
                "{:<22} client-side clipping of one update: {:.4} s (with the copy of the update)",
                "", c.median_s
            );
        }
        self.record(name, t, 0.0);
        Ok(())
    }

    /// Runs one case in this process.
    fn case(&mut self, case: &str) -> anyhow::Result<()> {
        match case {
            "student-forward" => self.forward(case, "student"),
            "teacher-forward" => self.forward(case, "teacher"),
            "student-step" => self.step(case, "student", false),
            "student-step-frozen" => self.step(case, "student", true),
            "teacher-step" => self.step(case, "teacher", false),
            "teacher-step-frozen" => self.step(case, "teacher", true),
            "mfcc" => self.mfcc(),
            "aggregate" => self.aggregate(case, false),
            "aggregate-dp" => self.aggregate(case, true),
            other => bail!("unknown case {other:?}"),
        }
    }
}

/// Runs one case in a child process (`bench --in-process`), so its peak memory is its own.
fn child_case(args: &Args, case: &str, threads: usize) -> anyhow::Result<CaseResult> {
    let child_out = std::env::temp_dir().join(format!(
        "fedhubert-bench-{}-{case}.json",
        std::process::id()
    ));
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--in-process", "--cases", case])
        .args(["--threads", &threads.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--repeat", &args.repeat.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .arg("--out")
        .arg(&child_out)
        .status()
        .context("running a bench case in a child process")?;
    if !status.success() {
        bail!("bench case {case} failed ({status})");
    }
    let mut child: BenchReport = serde_json::from_str(&std::fs::read_to_string(&child_out)?)
        .with_context(|| format!("reading {}", child_out.display()))?;
    std::fs::remove_file(&child_out).ok();
    child
        .cases
        .remove(case)
        .with_context(|| format!("{}: no case {case}", child_out.display()))
}

/// Our figures over those of a `bench/pytorch_reference.py` report, per case both have; prints
/// them and returns them with the reference report.
fn compare(
    ours: &BTreeMap<String, CaseResult>,
    path: &Path,
) -> anyhow::Result<(BTreeMap<String, Ratios>, Value)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let theirs: Value = serde_json::from_str(&text)?;
    let mut ratios = BTreeMap::new();
    eprintln!("\nours / PyTorch ({}):", path.display());
    for (name, ours) in ours {
        if theirs["cases"][name].as_object().is_none() {
            continue;
        }
        let t = &theirs["cases"][name];
        let num = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
        let (a, b) = (ours.median_s, num("median_s"));
        let (amin, bmin) = (ours.min_s, num("min_s"));
        let (acpu, bcpu) = (ours.cpu_s_per_call, num("cpu_s_per_call"));
        let (ma, mb) = (ours.peak_rss_mib, num("peak_rss_mib"));
        eprintln!(
            "{name:<22} median {a:.4} / {b:.4} s = {:.3}x  min {:.3}x  CPU {:.3}x  peak RSS {ma:.0} / {mb:.0} MiB = {:.3}x",
            a / b,
            amin / bmin,
            acpu / bcpu,
            ma / mb
        );
        ratios.insert(
            name.clone(),
            Ratios {
                median_ratio: a / b,
                min_ratio: amin / bmin,
                cpu_ratio: acpu / bcpu,
                peak_rss_ratio: ma / mb,
            },
        );
    }
    Ok((ratios, theirs))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .context("building the thread pool")?;
    }
    bench(&args)?;
    if !args.in_process {
        eprintln!("wrote {}", args.out.display());
    }
    Ok(())
}

/// Runs the cases (each in a child process unless `in_process`) and writes the report.
pub fn bench(args: &Args) -> anyhow::Result<BenchReport> {
    if args.repeat == 0 {
        bail!("--repeat must be >= 1");
    }
    let samples = (args.seconds * SAMPLE_RATE).round() as usize;
    let threads = rayon::current_num_threads();
    if !args.in_process {
        eprintln!(
            "fedhubert bench: batch {} x {:.2} s, {threads} threads, median of {} after {} warm-up",
            args.batch, args.seconds, args.repeat, args.warmup
        );
    }
    let mut ctx = Ctx {
        args,
        samples,
        audio_s: args.batch as f64 * samples as f64 / SAMPLE_RATE,
        results: Default::default(),
    };
    for case in args
        .cases
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        if args.in_process {
            ctx.case(case)?;
        } else {
            let r = child_case(args, case, threads)?;
            ctx.results.insert(case.to_string(), r);
        }
    }
    let mut report = BenchReport {
        side: "fedhubert".into(),
        threads,
        batch: args.batch,
        seconds: args.seconds,
        repeat: args.repeat,
        warmup: args.warmup,
        cases: ctx.results,
        vs_pytorch: None,
        pytorch: None,
    };
    if let Some(path) = &args.reference {
        let (ratios, theirs) = compare(&report.cases, path)?;
        report.vs_pytorch = Some(ratios);
        report.pytorch = Some(theirs);
    }
    fedhubert_io::atomic_write(&args.out, json_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(report)
}
