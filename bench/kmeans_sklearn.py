#!/usr/bin/env python3
"""scikit-learn reference for fedhubert's mini-batch k-means (fairseq HuBERT learn_kmeans.py settings).

Usage (run from /work/main):
  python3 bench/kmeans_sklearn.py --make-synthetic out/km_bench/frames.npy --frames 40000
  python3 bench/kmeans_sklearn.py out/km_bench/frames.npy --threads 2
  python3 bench/kmeans_sklearn.py --clients DIR --threads 2      # DIR/client_*/mfcc.npy concatenated

The script re-executes itself inside /work/main/.venv-bench (created on first use with
`python3 -m venv` + `pip install numpy scikit-learn`). It prints fit time and inertia = sum of squared
distances of all frames to their nearest centroid (the same quantity bench_kmeans prints).
"""
import argparse
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-bench")


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    # The venv is shared with other benchmarks: install what this one needs if it is missing.
    if subprocess.call([py, "-c", "import numpy, sklearn"], stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call([py, "-m", "pip", "install", "-q", "numpy", "scikit-learn"])
    os.execv(py, [py] + sys.argv)


def make_synthetic(path, frames, seed):
    """MFCC-shaped data: 39 dims (13 cepstra + deltas + delta-deltas), a 300-component Gaussian
    mixture with per-dimension scales that fall with the cepstral index, deltas at 1/3 and 1/9."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.concatenate([[15.0], 10.0 / np.sqrt(np.arange(1, 13))])
    scale = np.concatenate([base, base / 3, base / 9]).astype(np.float64)
    comps = 300
    means = rng.normal(size=(comps, 39)) * scale
    sds = rng.uniform(0.3, 0.8, size=(comps, 1)) * scale
    w = rng.dirichlet(np.ones(comps) * 2.0)
    z = rng.choice(comps, size=frames, p=w)
    x = means[z] + rng.normal(size=(frames, 39)) * sds[z]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, x.astype(np.float32))
    print(f"wrote {path} {x.shape} float32")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npy", nargs="?")
    ap.add_argument("--clients", help="client folders DIR/client_*/FEATURE.npy, concatenated in name order")
    ap.add_argument("--feature", default="mfcc")
    ap.add_argument("--make-synthetic", metavar="OUT")
    ap.add_argument("--frames", type=int, default=40000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=20)
    ap.add_argument("--save-concat", metavar="OUT", help="with --clients: also write the concatenated frames (to feed bench_kmeans)")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)
    ensure_venv()
    import numpy as np

    if a.make_synthetic:
        make_synthetic(a.make_synthetic, a.frames, a.seed)
        return
    if a.clients:
        files = sorted(glob.glob(os.path.join(a.clients, "client_*", a.feature + ".npy")))
        if not files:
            sys.exit(f"no {a.clients}/client_*/{a.feature}.npy")
        x = np.concatenate([np.load(f) for f in files]).astype(np.float32)
        src = f"{len(files)} clients under {a.clients}"
        if a.save_concat:
            np.save(a.save_concat, x)
    else:
        x = np.load(a.npy).astype(np.float32)
        src = a.npy
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits
    import sklearn

    km = MiniBatchKMeans(
        n_clusters=a.k, init="k-means++", max_iter=100, batch_size=10000, tol=0.0,
        max_no_improvement=100, n_init=a.n_init, reassignment_ratio=0.0,
        compute_labels=False, init_size=None, random_state=a.seed, verbose=0,
    )
    with threadpool_limits(limits=a.threads):
        t = time.perf_counter()
        km.fit(x)
        secs = time.perf_counter() - t
        c = km.cluster_centers_.astype(np.float64)
        xx = x.astype(np.float64)
        inertia = 0.0
        for i in range(0, len(xx), 65536):
            b = xx[i:i + 65536]
            d2 = (b * b).sum(1)[:, None] - 2 * b @ c.T + (c * c).sum(1)[None, :]
            j = d2.argmin(1)
            inertia += ((b - c[j]) ** 2).sum()
    print(f"data: {src} n={len(x)} d={x.shape[1]} k={a.k} threads={a.threads} sklearn={sklearn.__version__}")
    print(f"sklearn  time_s={secs:.3f} inertia={inertia:.6e} mean={inertia / len(x):.4f} n_steps={km.n_steps_} n_iter={km.n_iter_}")


if __name__ == "__main__":
    main()
