#!/usr/bin/env python3
"""torchaudio side of the MFCC benchmark (see BENCHMARKS.md, "## MFCC").

Featurizes every FLAC of assets/librispeech-sample with fairseq's HuBERT iteration-1 recipe
(torchaudio.compliance.kaldi.mfcc + compute_deltas twice), timing the features only (decoding is done
once up front, as in `cargo run --release -p fedhubert-features --example bench_mfcc`), and writes the
features to OUT/mfcc.npy + OUT/mfcc.len + OUT/ids.txt so the Rust side can report the max abs diff.

    python3 bench/mfcc_torchaudio.py [--threads N] [--repeat R] [--out DIR] [--ours DIR]

--ours DIR (from `bench_mfcc --write DIR`) also runs torchaudio in float64 and reports how far our
features and torchaudio's float32 ones each are from it (untimed).

Run with any python3: it creates .venv-bench at the repository root (pip install from PyPI:
torch==2.11.0 torchaudio==2.11.0 soundfile numpy, the versions the test fixture was made with) and
re-executes itself inside it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-bench"
PACKAGES = ["torch==2.11.0", "torchaudio==2.11.0", "soundfile", "numpy"]


def ensure_venv():
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists():
        print(f"creating {VENV} and installing {' '.join(PACKAGES)} from PyPI ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    probe = subprocess.run([str(py), "-c", "import torch, torchaudio, soundfile, numpy"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PACKAGES])
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fedhubert-bench-mfcc"))
    ap.add_argument("--audio", type=Path, default=REPO / "assets" / "librispeech-sample")
    ap.add_argument("--ours", type=Path, help="our features (bench_mfcc --write DIR): compare with a float64 run")
    args = ap.parse_args()

    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    torch.set_num_threads(args.threads)
    files = sorted(p.relative_to(args.audio).as_posix() for p in args.audio.rglob("*.flac"))
    waves = []
    for rel in files:
        x, sr = sf.read(str(args.audio / rel), dtype="float32")  # int16 / 32768, as fairseq and our decoder
        assert sr == 16000 and x.ndim == 1, rel
        waves.append(torch.from_numpy(x))
    seconds = sum(len(w) for w in waves) / 16000

    def featurize(x):
        # fairseq examples/hubert/simple_kmeans/dump_mfcc_feature.py, MfccFeatureReader.get_feats
        mfccs = torchaudio.compliance.kaldi.mfcc(waveform=x.unsqueeze(0), sample_frequency=16000, use_energy=False)
        mfccs = mfccs.transpose(0, 1)  # (freq, time)
        deltas = torchaudio.functional.compute_deltas(mfccs)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        concat = torch.cat([mfccs, deltas, ddeltas], dim=0)
        return concat.transpose(0, 1).contiguous()  # (time, 39)

    with torch.inference_mode():
        feats = [featurize(w) for w in waves]  # warm-up
        times, cpu = [], []
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            for w in waves:
                featurize(w)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    times.sort()
    cpu.sort()
    med = times[len(times) // 2]
    med_cpu = cpu[len(cpu) // 2]
    frames = sum(f.shape[0] for f in feats)
    print(
        f"torchaudio {torchaudio.__version__} (torch {torch.__version__}) mfcc39: threads {args.threads}, "
        f"{args.repeat} repeats, median {med:.4f} s wall (min {times[0]:.4f} s) per pass: "
        f"{len(files) / med:.1f} utt/s, {seconds / med:.0f} s audio/s, {frames / med:.0f} frames/s; "
        f"median CPU {med_cpu:.4f} s per pass ({seconds / med_cpu:.0f} s audio per CPU s) "
        f"({len(files)} utterances, {seconds:.1f} s of audio)"
    )

    if args.ours:
        ids = (args.ours / "ids.txt").read_text().split()
        assert ids == files, "--ours holds other utterances or another order"
        lens = [int(n) for n in (args.ours / "mfcc.len").read_text().split()]
        ours = np.load(args.ours / "mfcc.npy")
        off = np.cumsum([0] + lens)
        d_ours = d_t32 = 0.0
        with torch.inference_mode():
            for i, w in enumerate(waves):
                f64 = featurize(w.double()).numpy()
                d_ours = max(d_ours, float(np.abs(ours[off[i] : off[i + 1]] - f64).max()))
                d_t32 = max(d_t32, float(np.abs(feats[i].numpy() - f64).max()))
        print(
            f"vs torchaudio in float64: max |ours - f64| = {d_ours:.3e}, "
            f"max |torchaudio float32 - f64| = {d_t32:.3e}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "mfcc.npy", torch.cat(feats).numpy().astype("<f4"))
    (args.out / "mfcc.len").write_text("".join(f"{f.shape[0]}\n" for f in feats))
    (args.out / "ids.txt").write_text("".join(f"{r}\n" for r in files))
    (args.out / "result.json").write_text(
        json.dumps(
            {
                "threads": args.threads,
                "repeat": args.repeat,
                "median_s": med,
                "min_s": times[0],
                "median_cpu_s": med_cpu,
                "utterances": len(files),
                "audio_seconds": seconds,
                "frames": frames,
                "torch": torch.__version__,
                "torchaudio": torchaudio.__version__,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    ensure_venv()
    main()
