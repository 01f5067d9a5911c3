#!/usr/bin/env python3
"""PyTorch side of the model benchmark (see BENCHMARKS.md, "## Model: forward and training step").

Builds the same models as `fedhubert bench` with transformers' HubertModel (student: 384 hidden,
3 layers, 6 heads, FFN 1536; teacher: HuBERT Base; both with the full 7-layer conv front-end,
group norm, no conv bias, LayerDrop off, dropouts as our presets) and times, on the same synthetic
batch shape (default 4 x 2 s of 16 kHz audio):

- forward: eval mode under torch.inference_mode();
- step: one training step = fairseq-style masked prediction (conv-feature gradient scaled by 0.1,
  feature L2 penalty x10, 80% span masking of length 10, final_proj to 256 + cosine logits over
  100 label embeddings / 0.1, cross-entropy on masked frames), backward, global-norm clip 10 and
  torch.optim.AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.01): the work of our
  LocalTrainer::step;
- step-frozen: the same with the conv front-end frozen (HF freeze_feature_encoder(): no grad).

Peak memory is VmHWM, reset before each case via /proc/self/clear_refs (as the Rust side).

    python3 bench/pytorch_reference.py [--threads N] [--repeat R] [--out FILE] [--cases ...]

Run with any python3: it creates .venv-bench at the repository root (pip install from PyPI:
torch==2.11.0, the version bench/mfcc_torchaudio.py pins, plus transformers and numpy) and
re-executes itself inside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-bench"
PACKAGES = ["torch==2.11.0", "transformers", "numpy"]
SAMPLE_RATE = 16000


def ensure_venv():
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists():
        print(f"creating {VENV} and installing {' '.join(PACKAGES)} from PyPI ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    probe = subprocess.run([str(py), "-c", "import torch, transformers, numpy"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PACKAGES])
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return float(line.split()[1])
    return 0.0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def bench_config(name):
    from transformers import HubertConfig

    # Our HubertConfig::base() / student() (fairseq hubert_base_librispeech regularisation),
    # LayerDrop off on both sides.
    kw = dict(
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.1,
        layerdrop=0.0,
        mask_time_prob=0.8,
        mask_time_length=10,
        mask_time_min_masks=2,
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )
    if name == "student":
        kw.update(hidden_size=384, num_hidden_layers=3, num_attention_heads=6, intermediate_size=1536)
    return HubertConfig(**kw)


def conv_frames(cfg, samples):
    t = samples
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        t = (t - k) // s + 1
    return t


def front_end_flops(cfg, batch, samples):
    t, c_in, f = samples, 1, 0.0
    for c, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        t = (t - k) // s + 1
        f += 2.0 * batch * c * c_in * k * t
        c_in = c
    return f


def forward_flops(cfg, batch, samples):
    # Same formula as `forward_flops` in crates/cli/src/cmd/bench.rs.
    f = front_end_flops(cfg, batch, samples)
    t = conv_frames(cfg, samples)
    h, ff, b = cfg.hidden_size, cfg.intermediate_size, batch
    n = b * t
    f += 2.0 * n * cfg.conv_dim[-1] * h
    f += 2.0 * n * h * (h / cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    layer = 2.0 * n * 4 * h * h + 2.0 * 2 * b * t * t * h + 2.0 * 2 * n * h * ff
    return f + cfg.num_hidden_layers * layer


def step_flops(cfg, batch, samples, final_dim=256, classes=100):
    n = batch * conv_frames(cfg, samples)
    head = 2.0 * n * cfg.hidden_size * final_dim + 2.0 * n * final_dim * classes
    return 3.0 * (forward_flops(cfg, batch, samples) + head)


def synthetic_wavs(batch, samples, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    i = torch.arange(samples, dtype=torch.float32)
    tone = torch.sin(i * 0.0628) * 0.3
    return tone.unsqueeze(0) + (torch.rand(batch, samples, generator=g) - 0.5) * 0.2


def time_case(warmup, repeat, fn):
    before = status_kib("VmRSS:") / 1024
    reset_peak()
    for _ in range(warmup):
        fn()
    times = []
    c0 = time.process_time()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / repeat
    peak = status_kib("VmHWM:") / 1024
    return statistics.median(times), min(times), times, cpu, peak, before


class Pretrain:
    """HubertModel + fairseq HuBERT cosine head, trained like LocalTrainer::step."""

    def __init__(self, cfg, frozen, num_classes=100, final_dim=256):
        import torch
        from transformers import HubertModel

        self.cfg = cfg
        self.model = HubertModel(cfg)
        self.final_proj = torch.nn.Linear(cfg.hidden_size, final_dim)
        self.label_embs = torch.nn.Parameter(torch.rand(num_classes, final_dim))
        self.num_classes = num_classes
        self.features = None

        class GradMultiply(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g * 0.1

        def hook(module, inputs, output):
            out = output if frozen else GradMultiply.apply(output)
            self.features = out
            return out

        if frozen:
            self.model.feature_extractor._freeze_parameters()  # what freeze_feature_encoder() does
        self.model.feature_extractor.register_forward_hook(hook)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list(self.final_proj.parameters()) + [self.label_embs]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def step(self, wav, labels, seed):
        import numpy as np
        import torch
        import torch.nn.functional as F
        from transformers.models.hubert.modeling_hubert import _compute_mask_indices

        b = wav.shape[0]
        t = conv_frames(self.cfg, wav.shape[1])
        mask = _compute_mask_indices((b, t), mask_prob=0.8, mask_length=10, min_masks=2)
        mask = torch.from_numpy(mask)
        self.opt.zero_grad(set_to_none=True)
        out = self.model(wav, mask_time_indices=mask).last_hidden_state  # [B, T, H]
        proj = self.final_proj(out.reshape(b * t, -1))
        logits = F.cosine_similarity(proj.unsqueeze(1), self.label_embs.unsqueeze(0), dim=-1, eps=1e-8) / 0.1
        ce = F.cross_entropy(logits, labels[:, :t].reshape(-1), reduction="none")
        m = mask.reshape(-1).float()
        loss = (ce * m).sum() / m.sum().clamp(min=1) + 10.0 * self.features.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.opt.step()
        return float(loss.detach())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--cases",
        default="student-forward,student-step,student-step-frozen,teacher-forward",
        help="comma separated: student-forward, student-step, student-step-frozen, teacher-forward, teacher-step",
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "pytorch.json")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run all cases in this process (default: one child process per case, so that each "
        "case's peak memory is its own)",
    )
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.in_process:
        import tempfile

        results = {}
        report = None
        for case in cases:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "case.json"
                cmd = [sys.executable, __file__, "--in-process", "--cases", case, "--out", str(out)]
                for k in ("threads", "batch", "seconds", "repeat", "warmup"):
                    cmd += [f"--{k}", str(getattr(args, k))]
                subprocess.check_call(cmd)
                report = json.loads(out.read_text())
                results[case] = report["cases"][case]
        report["cases"] = results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
        return

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = round(args.seconds * SAMPLE_RATE)
    audio_s = args.batch * samples / SAMPLE_RATE
    print(
        f"pytorch_reference: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"batch {args.batch} x {args.seconds:.2f} s, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    results = {}

    def record(name, res, flops):
        secs, tmin, times, cpu, peak, before = res
        gf = flops / secs / 1e9 if flops else 0.0
        print(
            f"{name:<22} {secs:>8.4f} s (min {tmin:.4f}, CPU {cpu:.3f} s)  {audio_s / secs:>8.2f} s audio/s  "
            f"{gf:>7.1f} GFLOP/s  peak RSS {peak:>7.1f} MiB (+{peak - before:.1f})",
            file=sys.stderr,
        )
        results[name] = dict(
            median_s=secs,
            min_s=tmin,
            times_s=times,
            cpu_s_per_call=cpu,
            audio_s_per_s=audio_s / secs,
            gflop=flops / 1e9,
            gflop_per_s=gf,
            gflop_per_s_at_min=flops / tmin / 1e9 if flops else 0.0,
            peak_rss_mib=peak,
            rss_before_mib=before,
        )

    for case in cases:
        which = case.split("-")[0]
        cfg = bench_config(which)
        wav = synthetic_wavs(args.batch, samples, 1)
        if case.endswith("forward"):
            from transformers import HubertModel

            model = HubertModel(cfg).eval()

            def fwd():
                with torch.inference_mode():
                    model(wav).last_hidden_state.sum().item()

            record(case, time_case(args.warmup, args.repeat, fwd), forward_flops(cfg, args.batch, samples))
            del model
        elif "step" in case:
            frozen = case.endswith("frozen")
            pt = Pretrain(cfg, frozen)
            frames = round(samples * 100 / SAMPLE_RATE)
            labels = torch.randint(0, 100, (args.batch, frames), generator=torch.Generator().manual_seed(2))
            flops = step_flops(cfg, args.batch, samples)
            if frozen:
                flops -= 2.0 * front_end_flops(cfg, args.batch, samples)
            record(case, time_case(args.warmup, args.repeat, lambda: pt.step(wav, labels, 0)), flops)
            del pt
        else:
            raise SystemExit(f"unknown case {case!r}")

    report = dict(
        side="pytorch",
        torch=torch.__version__,
        transformers=transformers.__version__,
        threads=torch.get_num_threads(),
        batch=args.batch,
        seconds=args.seconds,
        repeat=args.repeat,
        warmup=args.warmup,
        cases=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    ensure_venv()
    main()
