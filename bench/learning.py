#!/usr/bin/env python3
"""The learning benchmark (BENCHMARKS.md, "Learning benchmark"): does pretraining learn
representations that transfer, federated as well as centralized?

    python3 bench/learning.py --data ../shared/data/librispeech-sample --out runs/learning
    python3 bench/learning.py ... --arms fedavg,fedavg_it2 --bin /path/to/fedhubert   # a subset

1. `prepare` splits DATA by speaker into 12 duration-balanced parts: 10 are the federated clients
   (the centralized arm pools them), 2 (about 15% of the speakers) are merged into an
   unseen-speaker set no arm ever trains on.
2. `features` (39-dim MFCC) everywhere; one federated k-means codebook (k = 100) over the 10
   clients; `kmeans --codebook` labels the unseen speakers with it.
3. Arms at equal compute (bench/learning.yaml: the same model, codebook, schedule and number of
   local updates): centralized; FedAvg over the 10 speaker clients; FedAdam; FedAvg with
   `local_optimizer_state: keep`; and `fedavg_it2`, HuBERT's second iteration on top of the
   `fedavg` arm's final model: `features --model` of its middle transformer layer
   (ceil(num_layers / 2), as fairseq takes layer 6 of Base's 12; not chosen by any downstream
   score) on every client and the unseen speakers, one federated k-means codebook (k = 100) on
   those 50 Hz frames, the unseen speakers labelled with it, then FedAvg pretraining from
   scratch on the new labels (`label_rate` 50) with the same schedule and number of local
   updates. Every arm is a resumable run: rerunning the script continues where it stopped
   (`--resume`).
   After every round (every logged step for centralized) the server evaluates masked-prediction
   accuracy on the unseen speakers beside their majority-cluster rate (fedavg_it2: of its own
   targets, so its accuracy is not comparable with the MFCC-target arms').
4. Downstream: the bundled speech commands, 5-fold speaker-disjoint, weighted layer sum and
   every layer alone, for each arm, random init, and the MFCC / fbank baselines.
5. Writes OUT/learning.md (the tables) and OUT/learning.png (unseen-speaker masked accuracy
   against local updates for every arm).

Plots with matplotlib from .venv-bench (created as bench/pytorch_reference.py does).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from venv_bootstrap import ensure_venv

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "learning.yaml"
NUM_CLIENTS = 10
HELDOUT_PARTS = 2
K = 100
DP = ["--set", "privacy.mode=central", "--set", "privacy.clipping_norm=5", "--set",
      "privacy.delta=1e-5", "--set", "privacy.sampling=fixed"]
ARMS = {
    "centralized": ["--centralized"],
    "fedavg": ["--simulation"],
    "fedadam": ["--simulation", "--strategy", "fedadam",
                "--set", "federated.eta=0.01", "--set", "federated.tau=0.001"],
    "fedavg_keep": ["--simulation", "--set", "pretraining.local_optimizer_state=keep"],
    # Partial participation, as FedAvg's paper runs it (C = 0.2): 2 of the 10 clients per round
    # for 5x the rounds, so the same 12,000 local updates buy 5x the sequential updates
    # (6,000 against 1,200); the warm-up stays 8% of the run.
    "fedavg_sampled": ["--simulation", "--set", "federated.client_fraction=0.2",
                       "--set", "federated.min_fit_clients=2", "--set", "federated.num_rounds=300",
                       "--set", "pretraining.warmup_rounds=25"],
    # Client-level DP-FedAvg (central noise) at epsilon 8 and 1, delta 1e-5, over the 60 planned
    # rounds of all 10 clients; C = 5, about the median update norm after the warm-up, measured
    # on a DP-free run of this config (BENCHMARKS.md, "Privacy").
    "fedavg_dp8": ["--simulation", *DP, "--set", "privacy.target_epsilon=8"],
    "fedavg_dp1": ["--simulation", *DP, "--set", "privacy.target_epsilon=1"],
    # + the iteration-2 labels (label_stem, label_rate): see prepare_it2
    "fedavg_it2": ["--simulation"],
}
IT2 = "fedavg_it2"
IT2_BASE = "fedavg"  # the iteration-1 arm whose final model iteration 2 clusters
IT2_LABELS = "km2"   # its label shard stem, beside the MFCC targets' `km`


class ArmFailed(Exception):
    """A run that stopped with an error (the DP arm at epsilon 1 diverges: its noise is the
    measurement, so the benchmark records the failure and goes on)."""


def sh(bin_, *args, log=None, may_fail=False):
    cmd = [str(bin_), *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as f:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(r.stdout)
    if r.returncode and may_fail:
        raise ArmFailed(r.stdout.strip().splitlines()[-1][:400])
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}")
    return r.stdout


def done(marker: Path) -> bool:
    return marker.is_file()


def prepare(fh, data: Path, out: Path):
    """Partition, features, federated k-means, unseen speakers labelled with the codebook."""
    part, held = out / "partition", out / "heldout"
    if done(out / "data.done"):
        return part, held / "client_heldout"
    for d in (part, held, out / "km", out / "km_heldout"):
        shutil.rmtree(d, ignore_errors=True)
    n = NUM_CLIENTS + HELDOUT_PARTS
    sh(fh, "prepare", "--data", data, "--out", part, "--num-clients", n, "--partition", "speaker")
    sh(fh, "features", "--clients", part)
    target = held / "client_heldout"
    target.mkdir(parents=True)
    shutil.copy(part / "partition.json", held / "partition.json")
    rows, header = [], None
    for c in range(NUM_CLIENTS, n):
        src = part / f"client_{c}"
        lines = (src / "manifest.csv").read_text().splitlines()
        header = lines[0]
        rows += lines[1:]
        shutil.rmtree(src)
    (target / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    sh(fh, "features", "--clients", held)
    sh(fh, "kmeans", "--clients", part, "--mode", "federated", "--k", K, "--out", out / "km")
    sh(fh, "kmeans", "--clients", held, "--codebook", out / "km" / "codebook.safetensors",
       "--out", out / "km_heldout")
    (out / "data.done").write_text("ok\n")
    return part, target


def prepare_it2(fh, out: Path, part: Path, heldout: Path) -> dict:
    """HuBERT iteration 2's targets: the middle layer of the `fedavg` arm's final model on every
    client and the unseen speakers, one federated k-means codebook over the clients, the unseen
    speakers labelled with it. Returns the record (layer, feature stem, labels, label rate)."""
    marker = out / "it2_data.done"
    if done(marker):
        return json.loads(marker.read_text())
    teacher = out / IT2_BASE / "hf"
    cfg = json.loads((teacher / "config.json").read_text())
    layer = max(1, math.ceil(cfg["num_hidden_layers"] / 2))
    rate = 16000 / math.prod(cfg["conv_stride"])
    feature = f"hubert_{layer}"
    log = out / "it2_data.log"
    km, km_held = out / "km_it2", out / "km_it2_heldout"
    for d in (km, km_held):
        shutil.rmtree(d, ignore_errors=True)
    print(f"iteration 2: layer {layer} of {cfg['num_hidden_layers']} of {teacher}, {rate:g} Hz",
          flush=True)
    for clients in (part, heldout.parent):
        sh(fh, "features", "--clients", clients, "--model", teacher, "--layer", layer, log=log)
    sh(fh, "kmeans", "--clients", part, "--mode", "federated", "--k", K, "--feature", feature,
       "--labels", IT2_LABELS, "--out", km, log=log)
    sh(fh, "kmeans", "--clients", heldout.parent, "--codebook", km / "codebook.safetensors",
       "--feature", feature, "--labels", IT2_LABELS, "--out", km_held, log=log)
    info = {"teacher": str(teacher), "layer": layer, "num_hidden_layers": cfg["num_hidden_layers"],
            "feature": feature, "labels": IT2_LABELS, "label_rate": rate, "k": K}
    marker.write_text(json.dumps(info) + "\n")
    return info


def config_int(key: str) -> int:
    """An integer key of bench/learning.yaml (flat `key: value` lines)."""
    line = next(l for l in CONFIG.read_text().splitlines() if l.strip().startswith(key + ":"))
    return int(line.split(":")[1].split("#")[0])


def updates_per_arm():
    return config_int("num_rounds") * config_int("local_steps") * config_int("num_clients")


def train(fh, out: Path, part: Path, heldout: Path, arm: str, steps: int, extra=()) -> bool:
    """Trains (or resumes) one arm; False when its run failed (recorded in `arm.failed`)."""
    run = out / arm
    if done(run / "arm.done"):
        return True
    if (run / "arm.failed").is_file():
        return False
    resume = (run / "checkpoint.safetensors").is_file() or (run / "trainer.safetensors").is_file()
    t0 = time.time()
    try:
        sh(fh, "pretrain", "--config", CONFIG, "--clients", part, "--out", run, "--heldout",
           heldout, "--steps", steps, *ARMS[arm], *extra, *(["--resume"] if resume else []),
           log=out / f"{arm}.log", may_fail=arm.startswith("fedavg_dp"))
    except ArmFailed as e:
        (run / "arm.failed").write_text(str(e) + "\n")
        print(f"arm {arm} failed: {e}", flush=True)
        return False
    (run / "arm.done").write_text(json.dumps({"wall_s_last_session": time.time() - t0}) + "\n")
    return True


def probe(fh, out: Path, name: str, upstream):
    dest = out / "probe" / name
    if not (dest / "probe.json").is_file():
        args = ["probe", "--upstream", upstream, "--folds", 5, "--layers", "each", "--out", dest]
        if upstream == "random":  # every arm has the same architecture (bench/learning.yaml)
            cfg = next(c for c in (out / a / "hf" / "config.json" for a in ARMS) if c.is_file())
            args += ["--config", cfg]
        sh(fh, *args, log=out / "probe.log")
    return json.loads((dest / "probe.json").read_text())


def curve(out: Path, arm: str):
    """(local updates so far, held-out masked accuracy, majority rate) per evaluation."""
    pts = []
    local_steps = config_int("local_steps")
    federated_updates = 0
    for line in (out / arm / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "round" in r:  # federated: every client that replied made local_steps updates
            federated_updates += len(r["participated"]) * local_steps
        ev = r.get("server_eval") or {}
        if "acc_masked" not in ev:
            continue
        if "round" in r:
            x = federated_updates
        else:
            x = r["step"]
        pts.append((x, ev["acc_masked"], ev["majority_rate"], ev.get("loss_masked")))
    return pts


def report(out: Path, probes: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {a: curve(out, a) for a in ARMS if (out / a / "metrics.jsonl").is_file()}
    it2 = json.loads((out / "it2_data.done").read_text()) if IT2 in curves else None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    majority = None
    for arm, pts in curves.items():
        if not pts:
            continue
        if arm == IT2:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                            label=f"{arm} (its own targets)")
            ax.axhline(pts[-1][2], color=line.get_color(), linestyle=":",
                       label=f"majority-cluster rate, {arm} targets")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=arm)
            majority = pts[-1][2]
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle="--",
                   label="majority-cluster rate" + (", MFCC targets" if it2 else ""))
    ax.set_xlabel("local updates (all clients together)")
    ax.set_ylabel("masked accuracy, unseen speakers")
    title = "Masked prediction on held-out speakers (k = %d MFCC clusters)" % K
    if it2:
        title = ("Masked prediction on held-out speakers (k = %d; MFCC clusters, %s: clusters of "
                 "%s layer %d)" % (K, IT2, IT2_BASE, it2["layer"]))
    ax.set_title(title, fontsize=9 if it2 else None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning.png")

    md = ["| arm | updates | unseen-speaker masked acc (last) | majority rate |", "|---|---:|---:|---:|"]
    for arm, pts in curves.items():
        if pts:
            name = arm if arm != IT2 else f"{arm} (targets: {IT2_BASE} layer {it2['layer']} k-means)"
            md.append(f"| {name} | {pts[-1][0]} | {pts[-1][1]:.3f} | {pts[-1][2]:.3f} |")
    md += ["", "| upstream | 5-fold accuracy | fold std | best layer (5-fold) | per layer (5-fold) |",
           "|---|---:|---:|---|---|"]
    for name, r in probes.items():
        cv = r["cross_validation"]
        layers = [(l["layer"], l["cv_accuracy"]) for l in r.get("per_layer", [])]
        best = max(layers, key=lambda x: x[1]) if layers else None
        md.append("| %s | %.3f | %.3f | %s | %s |" % (
            name, cv["accuracy"], cv["fold_std"],
            f"{best[0]}: {best[1]:.3f}" if best else "-",
            ", ".join(f"{a:.3f}" for _, a in layers)))
    (out / "learning.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ensure_venv(["matplotlib"], "import matplotlib")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LibriSpeech-layout folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "fedhubert",
                    help="the fedhubert binary (cargo build --release -p fedhubert-cli)")
    ap.add_argument("--arms", nargs="+", default=[",".join(ARMS)], metavar="ARM[,ARM...]",
                    help="the arms to run (comma- or space-separated; default: all of %s); "
                         "%s also runs %s, its starting point" % (", ".join(ARMS), IT2, IT2_BASE))
    args = ap.parse_args()
    arms = [a for s in args.arms for a in s.split(",") if a]
    if bad := [a for a in arms if a not in ARMS]:
        ap.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if IT2 in arms and IT2_BASE not in arms:
        arms.insert(arms.index(IT2), IT2_BASE)
    if IT2 in arms:  # iteration 2 needs iteration 1's final model
        arms.remove(IT2)
        arms.insert(arms.index(IT2_BASE) + 1, IT2)
    arms = list(dict.fromkeys(arms))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fh = args.bin.resolve()
    part, heldout = prepare(fh, args.data.resolve(), out)
    trained = []
    for arm in arms:
        extra = []
        if arm == IT2:
            it2 = prepare_it2(fh, out, part, heldout)
            extra = ["--set", f"pretraining.label_stem={it2['labels']}",
                     "--set", f"pretraining.label_rate={it2['label_rate']:g}"]
        t0 = time.time()
        if train(fh, out, part, heldout, arm, updates_per_arm(), extra):
            trained.append(arm)
        print(f"arm {arm}: {time.time() - t0:.0f} s this session", flush=True)
    probes = {arm: probe(fh, out, arm, out / arm / "hf") for arm in trained}
    probes["random"] = probe(fh, out, "random", "random")
    probes["mfcc"] = probe(fh, out, "mfcc", "mfcc")
    probes["fbank"] = probe(fh, out, "fbank", "fbank")
    report(out, probes)


if __name__ == "__main__":
    main()
