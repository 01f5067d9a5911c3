"""The Flower app end to end, on loopback: real `flower-superlink` and `flower-supernode`
processes (insecure and TLS), the simulation runtime, and parity with the native
`fedhubert pretrain --simulation` run on the same data and seed.

Needs the `fedhubert` extension (maturin develop), flwr, and the `fedhubert` binary
(FEDHUBERT_BIN, default target/debug/fedhubert); scripts/test.sh sets all of that up.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedhubert

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "flower"
BIN_DIR = Path(sys.executable).parent
ROUNDS = 2
# The quick demo's settings: small enough for 2 CI cores, enough steps to move the weights.
OVERRIDES = [
    "pretraining.vocab_size=50",
    "pretraining.local_steps=3",
    f"federated.num_rounds={ROUNDS}",
    "federated.seed=7",
    # A schedule that does not depend on the run's length, so the run stopped after round 1
    # (num_rounds=1) and resumed is the native 2-round run; the warm-up ends inside round 1,
    # so the per-step rates still travel and are applied through Flower.
    "pretraining.lr_schedule=fixed",
    "pretraining.warmup_updates=2",
    "pretraining.warmup_rounds=null",
]
STARTUP_S = 60
RUN_S = 900


def fedhubert_bin() -> Path:
    p = Path(os.environ.get("FEDHUBERT_BIN", ROOT / "target" / "debug" / "fedhubert"))
    if not p.is_file():
        pytest.fail(f"{p}: no fedhubert binary; build it with `cargo build -p fedhubert-cli` or set FEDHUBERT_BIN")
    return p


def run_cli(*args: str, cwd: Path = ROOT) -> None:
    subprocess.run([str(fedhubert_bin()), *args], cwd=cwd, check=True, timeout=900)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flower")


@pytest.fixture(scope="session")
def partitions(work: Path) -> Path:
    """Two speaker clients of the bundled sample with MFCC k-means labels (the demo pipeline)."""
    parts = work / "partition"
    run_cli("prepare", "--data", str(ROOT / "assets/librispeech-sample"), "--out", str(parts),
            "--num-clients", "2", "--partition", "speaker", "--seed", "0")
    run_cli("features", "--clients", str(parts))
    run_cli("kmeans", "--clients", str(parts), "--mode", "federated", "--k", "50",
            "--out", str(work / "kmeans"), "--seed", "0")
    return parts


@pytest.fixture(scope="session")
def native(work: Path, partitions: Path) -> Path:
    out = work / "native"
    args = ["pretrain", "--config", str(ROOT / "configs/tiny.yaml"), "--clients", str(partitions),
            "--simulation", "--out", str(out)]
    for o in OVERRIDES:
        args += ["--set", o]
    run_cli(*args)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes this test started, each in its own session so its children go with it."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                             cwd=self.logdir, start_new_session=True)
        self.procs.append((name, p))
        return p

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-n:]

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def wait_port(port: int, procs: Procs) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {STARTUP_S} s")


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhubert test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return d / "ca.crt", d / "server.pem", d / "server.key"


def make_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


def flwr_env(home: Path) -> dict:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def write_connection(home: Path, port: int, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n{tls}\n')


def flwr_run(env: dict, out: Path, extra_config: dict, procs: Procs | None, logdir: Path,
             federation_config: str | None = None) -> str:
    cfg = {"out-dir": str(out), "set": " ".join(OVERRIDES), **extra_config}
    run_config = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in cfg.items())
    argv = [str(BIN_DIR / "flwr"), "run", str(APP), "test", "--run-config", run_config, "--stream"]
    if federation_config:
        argv += ["--federation-config", federation_config]
    log_path = logdir / f"flwr-run-{out.name}-{int(time.time() * 1000)}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, env=env, cwd=logdir, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            # `--stream` follows the run's logs and returns when the run has ended.
            while p.poll() is None:
                if procs:
                    procs.check_alive()
                if time.monotonic() - t0 > RUN_S:
                    raise AssertionError(f"flwr run did not finish in {RUN_S} s")
                time.sleep(1)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    return log_path.read_text(errors="replace")


def check_against_native(out: Path, native: Path, log: str, resumed: bool = False) -> list[dict]:
    assert (out / "summary.json").is_file(), f"the Flower run wrote no summary; its log:\n{log[-6000:]}"
    ck = fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))
    nat = fedhubert.read_checkpoint(str(native / "checkpoint.safetensors"))
    assert ck["round"] == ROUNDS
    hist = json.loads(ck["history"])
    nat_hist = json.loads(nat["history"])
    assert [h["round"] for h in hist] == list(range(1, ROUNDS + 1))
    for h, n in zip(hist, nat_hist):
        # Metrics arrived: training from both clients, evaluation on their validation sets.
        assert h["participated"] == [0, 1] and not h["failures"]
        assert np.isfinite(h["train"]["loss"]) and h["train"]["steps"] > 0
        assert np.isfinite(h["eval"]["loss"]) and h["num_examples"] > 0
        for key in ("participated", "num_examples", "bytes_up", "bytes_down"):
            assert h[key] == n[key], f"round {h['round']} {key}: flower {h[key]} native {n[key]}"
        for sec in ("train", "eval"):
            assert h[sec].keys() == n[sec].keys()
            for k in h[sec]:
                a, b = h[sec][k], n[sec][k]
                # Exact, grad_norm and a resumed history (read back from JSON) included.
                assert a == b, f"round {h['round']} {sec}.{k}: flower {a!r} native {b!r}"
    # The global model moved away from the initial weights, identically to the native run.
    initial = fedhubert.Server(fedhubert.load_run_file(str(ROOT / "configs/tiny.yaml"), OVERRIDES),
                               str(out / "fresh"), 2, False).global_arrays()
    g, ng = ck["global"], nat["global"]
    assert list(g) == list(ng) == list(initial)
    assert any(not np.array_equal(g[k], initial[k]) for k in g), "the global model did not change"
    diff = [k for k in g if not np.array_equal(g[k], ng[k])]
    assert not diff, f"{len(diff)} tensors differ from the native run, e.g. {diff[:3]}"
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "config.json").is_file()
    # The round checkpoint alone exports the same HuggingFace model as the run's final export.
    run_file = fedhubert.load_run_file(str(ROOT / "configs/tiny.yaml"), OVERRIDES)
    fedhubert.export_hf(str(out / "checkpoint.safetensors"), run_file, str(out / "hf-from-checkpoint"))
    assert (out / "hf-from-checkpoint" / "model.safetensors").read_bytes() == \
        (out / "hf" / "model.safetensors").read_bytes()
    return hist


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls-node-auth"])
def test_deployment_loopback(tls: bool, work: Path, partitions: Path, native: Path):
    """SuperLink + two SuperNodes on loopback, `flwr run` for 2 rounds, compared with native.
    With TLS the SuperLink also admits only SuperNodes whose public keys were registered."""
    name = "tls" if tls else "insecure"
    d = work / f"deploy-{name}"
    logs = d / "logs"
    logs.mkdir(parents=True)
    home = d / "flwr-home"
    port = free_port()
    env = flwr_env(home)
    ca = None
    if tls:
        ca, cert, key = make_certs(d)
        link_sec = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                    "--enable-supernode-auth"]
        node_sec = ["--root-certificates", str(ca)]
    else:
        link_sec = node_sec = ["--insecure"]
    write_connection(home, port, ca)
    procs = Procs(logs)
    try:
        procs.start("superlink", [str(BIN_DIR / "flower-superlink"), *link_sec, "--host", "127.0.0.1",
                                  "--port", str(port), "--disable-runtime-dependency-installation"], env)
        wait_port(port, procs)
        for k in range(2):
            auth = []
            if tls:
                priv, pub = make_node_key(d, f"supernode{k}_key")
                subprocess.run([str(BIN_DIR / "flwr"), "supernode", "register", str(pub), "test"],
                               env=env, cwd=logs, check=True, timeout=STARTUP_S)
                auth = ["--auth-supernode-private-key", str(priv)]
            procs.start(f"supernode{k}", [
                str(BIN_DIR / "flower-supernode"), *node_sec, *auth, "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", f'partition="{partitions / f"client_{k}"}"',
            ], env)
        out = d / "run"
        log = flwr_run(env, out, {"min-nodes": 2, "node-wait-s": STARTUP_S}, procs, logs)
        hist = check_against_native(out, native, log + procs.tail("superlink"))
        print(f"\n[{name}] flower per-round metrics:")
        for h in hist:
            print(json.dumps({"round": h["round"], "train": h["train"], "eval": h["eval"]}))
    finally:
        procs.stop()


@contextlib.contextmanager
def simulation_superlink(d: Path):
    """A simulation SuperLink (Ray) on loopback for `flwr run`, stopped on exit; yields
    (env, procs, logs) for `flwr_run`."""
    logs = d / "logs"
    logs.mkdir(parents=True)
    home = d / "flwr-home"
    port = free_port()
    env = flwr_env(home)
    write_connection(home, port, None)
    procs = Procs(logs)
    try:
        procs.start("superlink", [str(BIN_DIR / "flower-superlink"), "--insecure", "--simulation",
                                  "--host", "127.0.0.1", "--port", str(port),
                                  "--disable-runtime-dependency-installation"], env)
        wait_port(port, procs)
        yield env, procs, logs
    finally:
        procs.stop()


def test_simulation_runtime_and_resume(work: Path, partitions: Path, native: Path):
    """`flwr run` on a simulation SuperLink (Ray), stopped after round 1 and resumed: the same
    weights as the native run, bit for bit."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    d = work / "simulation"
    with simulation_superlink(d) as (env, procs, logs):
        out = d / "run"
        fed = "num-supernodes=2"
        first = dict(partitions=str(partitions), **{"set": " ".join(OVERRIDES + ["federated.num_rounds=1"])})
        log = flwr_run(env, out, first, procs, logs, fed)
        ck = fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))
        assert ck["round"] == 1, log[-4000:]
        (out / "summary.json").unlink()
        log = flwr_run(env, out, {"partitions": str(partitions), "resume": True}, procs, logs, fed)
        assert "resuming after round 1" in log, log[-4000:]
        hist = check_against_native(out, native, log + procs.tail("superlink"), resumed=True)
        print("\n[simulation] flower per-round metrics:")
        for h in hist:
            print(json.dumps({"round": h["round"], "train": h["train"], "eval": h["eval"]}))


# Client-level DP with reproducible noise (never the default: `noise: os` cannot be replayed).
DP_OVERRIDES = [
    "privacy.mode=central", "privacy.clipping_norm=0.5", "privacy.noise_multiplier=0.3",
    "privacy.delta=0.001", "privacy.sampling=fixed", "privacy.noise=seeded",
]


def test_differential_privacy_over_flower_matches_native(work: Path, partitions: Path):
    """DP-FedAvg on the simulation runtime: the clipped, noised global model and the privacy
    ledger are bit-identical to the native run; no client training metric is published."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    native_dp = work / "native-dp"
    args = ["pretrain", "--config", str(ROOT / "configs/tiny.yaml"), "--clients", str(partitions),
            "--simulation", "--out", str(native_dp)]
    for o in OVERRIDES + DP_OVERRIDES:
        args += ["--set", o]
    run_cli(*args)
    d = work / "simulation-dp"
    with simulation_superlink(d) as (env, procs, logs):
        out = d / "run"
        cfg = {"partitions": str(partitions), "set": " ".join(OVERRIDES + DP_OVERRIDES)}
        log = flwr_run(env, out, cfg, procs, logs, "num-supernodes=2")
    assert (out / "summary.json").is_file(), log[-6000:]
    ck = fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))
    nat = fedhubert.read_checkpoint(str(native_dp / "checkpoint.safetensors"))
    hist, nat_hist = json.loads(ck["history"]), json.loads(nat["history"])
    assert len(hist) == ROUNDS
    for h, n in zip(hist, nat_hist):
        assert h["train"] == {} and h["num_examples"] == 2, h
        assert h["privacy"] == n["privacy"], (h["privacy"], n["privacy"])
    eps = [h["privacy"]["epsilon"] for h in hist]
    assert 0 < eps[0] < eps[1], eps
    diff = [k for k in ck["global"] if not np.array_equal(ck["global"][k], nat["global"][k])]
    assert not diff, f"{len(diff)} tensors differ from the native run, e.g. {diff[:3]}"
    assert json.loads((out / "summary.json").read_text())["privacy"]["epsilon"] == eps[-1]
    assert "epsilon" in log
    card = (out / "hf" / "README.md").read_text()
    assert "2 Flower nodes" in card and f"epsilon {eps[-1]:.4f}" in card, card


def test_federated_kmeans_over_flower_matches_native(work: Path, partitions: Path):
    """mode="kmeans" in the simulation runtime: the global codebook learned over the nodes from
    sums and counts, and the labels each node writes, are byte-identical to `fedhubert kmeans
    --mode federated` on the same partition (the `partitions` fixture made those)."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    d = work / "kmeans-flower"
    parts = d / "partition"
    for k in range(2):
        src, dst = partitions / f"client_{k}", parts / f"client_{k}"
        dst.mkdir(parents=True)
        # The features travel with their provenance record, which the labelling checks.
        for name in ("manifest.csv", "mfcc.npy", "mfcc.len", "mfcc.provenance.json"):
            shutil.copy(src / name, dst / name)
    with simulation_superlink(d) as (env, procs, logs):
        out = d / "run"
        log = flwr_run(env, out, {"mode": "kmeans", "partitions": str(parts), "kmeans-k": 50,
                                  "kmeans-seed": 0}, procs, logs, "num-supernodes=2")
    assert (out / "kmeans_summary.json").is_file(), log[-4000:]
    summary = json.loads((out / "kmeans_summary.json").read_text())
    native = json.loads((work / "kmeans" / "summary.json").read_text())
    assert summary["rounds"] == native["fit"]["rounds"] and summary["rounds"] > 1
    assert (out / "codebook.safetensors").read_bytes() == \
        (work / "kmeans" / "codebook.safetensors").read_bytes(), "codebook differs from the native fit"
    for k in range(2):
        for name in ("km.npy", "km.len"):
            assert (parts / f"client_{k}" / name).read_bytes() == \
                (partitions / f"client_{k}" / name).read_bytes(), f"client_{k}/{name} differs"
    print(f"\n[kmeans] flower: {summary['rounds']} rounds, inertia {summary['inertia']:.6f} over "
          f"{summary['n_frames']} frames, {summary['empty_clusters']} empty clusters (native: identical bytes)")


def test_layer_features_over_flower_match_native(work: Path, partitions: Path, native: Path):
    """mode="features" in the simulation runtime (HuBERT iteration 2): every node computes layer 1
    of the native teacher, sent by the ServerApp, on its own partition; the shards are
    byte-identical to `fedhubert features --model --layer 1` on the same folders."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    d = work / "features-flower"
    parts, ref = d / "partition", d / "reference"
    for dst in (parts, ref):
        dst.mkdir(parents=True)
        shutil.copy(partitions / "partition.json", dst / "partition.json")
        for k in range(2):
            (dst / f"client_{k}").mkdir()
            shutil.copy(partitions / f"client_{k}" / "manifest.csv", dst / f"client_{k}" / "manifest.csv")
    model = native / "model.safetensors"
    run_cli("features", "--clients", str(ref), "--model", str(model), "--layer", "1")
    with simulation_superlink(d) as (env, procs, logs):
        out = d / "run"
        log = flwr_run(env, out, {"mode": "features", "partitions": str(parts),
                                  "features-model": str(model), "features-layer": 1},
                       procs, logs, "num-supernodes=2")
    assert (out / "features_summary.json").is_file(), log[-4000:]
    for k in range(2):
        for name in ("hubert_1.npy", "hubert_1.len"):
            assert (parts / f"client_{k}" / name).read_bytes() == \
                (ref / f"client_{k}" / name).read_bytes(), f"client_{k}/{name} differs"
        rec = json.loads((parts / f"client_{k}" / "hubert_1.provenance.json").read_text())
        assert rec["params"]["frame_rate"] == 50.0 and rec["params"]["layer"] == 1


# HuBERT's second iteration over Flower: layer features of the iteration-1 model (the `native`
# run), federated k-means on them into `km2` labels at the model's 50 Hz, and a fresh model
# pretrained on those labels; every stage a Flower run, checked against the native CLI.
IT2_LAYER = 1
IT2_K = 20
IT2_RATE = 50
IT2_OVERRIDES = [o for o in OVERRIDES if not o.startswith("pretraining.vocab_size=")] + [
    f"pretraining.vocab_size={IT2_K}",
    "pretraining.label_stem=km2",
    f"pretraining.label_rate={IT2_RATE}",
]


def test_iteration_two_over_flower(work: Path, partitions: Path, native: Path):
    """HuBERT iteration 2 entirely over Flower, in the simulation runtime: mode="features" (layer
    1 of the iteration-1 model), mode="kmeans" on `hubert_1` into `km2` labels, then pretraining a
    fresh model on them with label_rate 50. Each stage is byte-identical to the native CLI's
    (`fedhubert features --model --layer`, `kmeans --feature hubert_1`, `pretrain --simulation`);
    pretraining on the 50 Hz labels with label_rate 100 is refused, naming both rates."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    d = work / "iteration2-flower"
    parts, ref = d / "partition", d / "reference"
    for dst in (parts, ref):
        dst.mkdir(parents=True)
        shutil.copy(partitions / "partition.json", dst / "partition.json")
        for k in range(2):
            (dst / f"client_{k}").mkdir()
            shutil.copy(partitions / f"client_{k}" / "manifest.csv", dst / f"client_{k}" / "manifest.csv")
    model = native / "model.safetensors"
    feature = f"hubert_{IT2_LAYER}"
    # The native iteration 2 on the reference copy of the partition.
    run_cli("features", "--clients", str(ref), "--model", str(model), "--layer", str(IT2_LAYER))
    run_cli("kmeans", "--clients", str(ref), "--mode", "federated", "--k", str(IT2_K), "--feature", feature,
            "--labels", "km2", "--out", str(d / "kmeans-native"), "--seed", "0")
    nat_out = d / "pretrain-native"
    args = ["pretrain", "--config", str(ROOT / "configs/tiny.yaml"), "--clients", str(ref),
            "--simulation", "--out", str(nat_out)]
    for o in IT2_OVERRIDES:
        args += ["--set", o]
    run_cli(*args)

    fed = "num-supernodes=2"
    with simulation_superlink(d) as (env, procs, logs):
        log = flwr_run(env, d / "features", {"mode": "features", "partitions": str(parts),
                                             "features-model": str(model), "features-layer": IT2_LAYER},
                       procs, logs, fed)
        assert (d / "features" / "features_summary.json").is_file(), log[-4000:]
        km_out = d / "kmeans"
        log = flwr_run(env, km_out, {"mode": "kmeans", "partitions": str(parts), "kmeans-k": IT2_K,
                                     "kmeans-feature": feature, "kmeans-labels": "km2", "kmeans-seed": 0},
                       procs, logs, fed)
        assert (km_out / "kmeans_summary.json").is_file(), log[-4000:]
        # A label rate that is not the labels' is refused, with both rates named.
        bad_out = d / "pretrain-100hz"
        bad_set = [o for o in IT2_OVERRIDES if not o.startswith("pretraining.label_rate=")]
        bad_log = flwr_run(env, bad_out, {"partitions": str(parts), "set": " ".join(
            bad_set + ["pretraining.label_rate=100"])}, procs, logs, fed)
        out = d / "pretrain"
        log = flwr_run(env, out, {"partitions": str(parts), "set": " ".join(IT2_OVERRIDES)}, procs, logs, fed)

    # Features and labels: the native bytes, the labels recorded at 50 Hz from one codebook.
    summary = json.loads((km_out / "kmeans_summary.json").read_text())
    assert summary["k"] == IT2_K and summary["rounds"] > 1
    assert (km_out / "codebook.safetensors").read_bytes() == \
        (d / "kmeans-native" / "codebook.safetensors").read_bytes(), "codebook differs from the native fit"
    codebooks = set()
    for k in range(2):
        for name in (f"{feature}.npy", f"{feature}.len", "km2.npy", "km2.len"):
            assert (parts / f"client_{k}" / name).read_bytes() == \
                (ref / f"client_{k}" / name).read_bytes(), f"client_{k}/{name} differs"
        rec = json.loads((parts / f"client_{k}" / "km2.provenance.json").read_text())
        assert rec["params"]["label_rate"] == IT2_RATE and rec["params"]["feature"] == feature
        assert rec["params"]["k"] == IT2_K
        codebooks.add(rec["params"]["codebook"])
    nat_rec = json.loads((ref / "client_0" / "km2.provenance.json").read_text())
    assert codebooks == {nat_rec["params"]["codebook"]}

    # The mismatch never trained: every node refused it when it opened its partition, before
    # round 1, with both rates in the message.
    assert "SuperNode discovery failed" in bad_log and "round   1" not in bad_log, bad_log[-4000:]
    assert not (bad_out / "checkpoint.safetensors").exists(), bad_log[-4000:]
    for k in range(2):
        assert f"client_{k}/km2.npy: labels at 50 Hz but pretraining.label_rate is 100" in bad_log, \
            bad_log[-4000:]
    bad_rf = fedhubert.load_run_file(str(ROOT / "configs/tiny.yaml"), bad_set + ["pretraining.label_rate=100"])
    with pytest.raises(RuntimeError, match="labels at 50 Hz but pretraining.label_rate is 100"):
        fedhubert.Client(str(parts / "client_0"), bad_rf)

    # Pretraining on the new labels: finite losses, a checkpoint, the native run's weights.
    assert (out / "summary.json").is_file(), f"the Flower run wrote no summary; its log:\n{log[-6000:]}"
    ck = fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))
    nat = fedhubert.read_checkpoint(str(nat_out / "checkpoint.safetensors"))
    assert ck["round"] == nat["round"] == ROUNDS
    hist, nat_hist = json.loads(ck["history"]), json.loads(nat["history"])
    for h, n in zip(hist, nat_hist, strict=True):
        assert h["participated"] == [0, 1] and not h["failures"]
        assert np.isfinite(h["train"]["loss"]) and np.isfinite(h["eval"]["loss"])
        for sec in ("train", "eval"):
            same_numbers(h[sec], n[sec], f"round {h['round']} {sec}")
    g, ng = ck["global"], nat["global"]
    assert list(g) == list(ng)
    diff = [k for k in g if not np.array_equal(g[k], ng[k])]
    assert not diff, f"{len(diff)} tensors differ from the native run, e.g. {diff[:3]}"
    assert (out / "model.safetensors").is_file() and (out / "hf" / "model.safetensors").is_file()
    # The run pinned the labels it trained on, as the native run did.
    pinned = json.loads((out / "labels.json").read_text())
    assert pinned == json.loads((nat_out / "labels.json").read_text())
    assert pinned == {"codebook": nat_rec["params"]["codebook"], "label_stem": "km2", "label_rate": IT2_RATE}
    print(f"\n[iteration 2] flower: layer {IT2_LAYER} features, k={IT2_K} in {summary['rounds']} rounds, "
          f"train loss per round {[h['train']['loss'] for h in hist]} (native: identical)")


def test_kmeans_bad_input_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="client_9.*mfcc"):
        fedhubert.KmeansClient(str(tmp_path / "client_9"))
    with pytest.raises(ValueError, match="plain shard name"):
        fedhubert.KmeansClient(str(tmp_path / "client_9"), "../../etc/x")
    with pytest.raises(ValueError, match="k = 0"):
        fedhubert.KmeansServer(0, 2)
    with pytest.raises(ValueError, match="update"):
        fedhubert.KmeansServer(10, 2, update="sgd")
    with pytest.raises(RuntimeError, match="init"):
        fedhubert.KmeansServer(10, 2).next_round()


def test_bad_partition_is_named():
    run_file = fedhubert.load_run_file("tiny", ["pretraining.vocab_size=50"])
    with pytest.raises(ValueError, match="no-such-dir.*manifest.csv"):
        fedhubert.Client("/tmp/no-such-dir/client_0", run_file)
    with pytest.raises(ValueError, match="nope.yaml"):
        fedhubert.load_run_file("/tmp/nope.yaml")
    with pytest.raises(ValueError, match="learning_rat"):
        fedhubert.load_run_file("tiny", ["pretraining.learning_rat=1"])


# Server-side distillation (`fedhubert distill --mode server`): the pretraining run above is the
# teacher; two clients train the tiny student, the server distils after every aggregation.
KD_ROUNDS = 2
KD_OVERRIDES = [
    "federated.num_clients=2",
    f"federated.num_rounds={KD_ROUNDS}",
    "federated.seed=3",
    "pretraining.local_steps=2",
    # Independent of the run's length (see OVERRIDES).
    "pretraining.lr_schedule=fixed",
    "pretraining.warmup_updates=1",
    "pretraining.warmup_rounds=null",
    "distillation.server_steps=3",
    # DistilHuBERT prediction heads: server-only weights that must survive the resume.
    "distillation.pred_weight=1.0",
]


@pytest.fixture(scope="session")
def kd_partitions(work: Path) -> Path:
    """Three speaker groups with k-means labels: clients 0 and 1, and client_2 as the server-side
    set (labelled, so the server's distillation blends in masked prediction as configured)."""
    parts = work / "kd-partition"
    run_cli("prepare", "--data", str(ROOT / "assets/librispeech-sample"), "--out", str(parts),
            "--num-clients", "3", "--partition", "speaker", "--seed", "0")
    run_cli("features", "--clients", str(parts))
    run_cli("kmeans", "--clients", str(parts), "--mode", "federated", "--k", "50",
            "--out", str(work / "kd-kmeans"), "--seed", "0")
    return parts


def kd_native_args(parts: Path, teacher_run: Path, out: Path) -> list[str]:
    args = ["distill", "--mode", "server", "--config", str(ROOT / "configs/tiny_student.yaml"),
            "--teacher", str(teacher_run / "model.safetensors"), "--clients", str(parts),
            "--server-set", str(parts / "client_2"), "--out", str(out)]
    for o in KD_OVERRIDES:
        args += ["--set", o]
    return args


@pytest.fixture(scope="session")
def kd_native(work: Path, kd_partitions: Path, native: Path) -> Path:
    out = work / "kd-native"
    run_cli(*kd_native_args(kd_partitions, native, out))
    return out


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape, raw bytes)}): the content, whatever the header's key order."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    return meta, {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in header.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_numbers(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        x, y = a[k], b[k]
        # Exact, grad_norm and values read back from JSON on resume included.
        assert x == y, f"{where}.{k}: flower {x!r} native {y!r}"


def test_server_distillation_simulation(work: Path, kd_partitions: Path, native: Path,
                                        kd_native: Path):
    """`mode="distill-server"` on a simulation SuperLink, stopped after round 1 and resumed:
    the same student, server heads and optimizer state, metrics and server distillation log as
    `fedhubert distill --mode server`, which also resumes the Flower run's checkpoint."""
    pytest.importorskip("ray", reason="the simulation runtime needs flwr[simulation]")
    d = work / "kd-simulation"
    teacher = native / "model.safetensors"
    server_set = kd_partitions / "client_2"
    kd_config = {"mode": "distill-server", "config": str(ROOT / "configs/tiny_student.yaml"),
                 "teacher": str(teacher), "server-set": str(server_set),
                 "partitions": str(kd_partitions)}
    with simulation_superlink(d) as (env, procs, logs):
        out = d / "run"
        fed = "num-supernodes=2"
        first = {**kd_config, "set": " ".join(KD_OVERRIDES + ["federated.num_rounds=1"])}
        log = flwr_run(env, out, first, procs, logs, fed)
        assert fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))["round"] == 1, log[-4000:]
        shutil.copytree(out, d / "native-resumed")
        log = flwr_run(env, out, {**kd_config, "set": " ".join(KD_OVERRIDES), "resume": True},
                       procs, logs, fed)
        assert "resuming after round 1" in log, log[-4000:]
        assert "server distillation 3 steps" in log, log[-4000:]
    assert (out / "summary.json").is_file(), f"the Flower run wrote no summary; its log:\n{log[-6000:]}"

    ck = fedhubert.read_checkpoint(str(out / "checkpoint.safetensors"))
    nat = fedhubert.read_checkpoint(str(kd_native / "checkpoint.safetensors"))
    assert ck["round"] == nat["round"] == KD_ROUNDS
    # The student, and the server's distillation heads and AdamW moments, tensor for tensor.
    g, ng = ck["global"], nat["global"]
    assert list(g) == list(ng)
    diff = [k for k in g if not np.array_equal(g[k], ng[k])]
    assert not diff, f"{len(diff)} of {len(g)} student tensors differ from the native run, e.g. {diff[:3]}"
    assert ck["state"].keys() == nat["state"].keys() and "server_aux" in ck["state"]
    for name in ck["state"]:
        s, ns = ck["state"][name], nat["state"][name]
        assert list(s) == list(ns) and all(np.array_equal(s[k], ns[k]) for k in s), name
    # Client metrics per round.
    hist, nat_hist = json.loads(ck["history"]), json.loads(nat["history"])
    for h, n in zip(hist, nat_hist, strict=True):
        assert h["participated"] == n["participated"] == [0, 1] and not h["failures"]
        for key in ("num_examples", "bytes_up", "bytes_down"):
            assert h[key] == n[key], f"round {h['round']} {key}"
        for sec in ("train", "eval"):
            same_numbers(h[sec], n[sec], f"round {h['round']} {sec}")
    # The server's distillation losses per round (round 1's came back from the file on resume).
    kd, nat_kd = read_jsonl(out / "server_distill.jsonl"), read_jsonl(kd_native / "server_distill.jsonl")
    assert [r["round"] for r in kd] == [r["round"] for r in nat_kd] == list(range(1, KD_ROUNDS + 1))
    for r, n in zip(kd, nat_kd):
        for part in ("first", "mean", "last"):
            same_numbers(r[part], n[part], f"server distillation round {r['round']} {part}")
        assert r["last"]["steps"] == 1 and r["mean"]["steps"] == 3
        assert np.isfinite(r["last"]["kl"]) and r["last"]["feature_mse"] > 0 and r["last"]["pred_l1"] > 0
    summary = json.loads((out / "summary.json").read_text())
    nat_summary = json.loads((kd_native / "summary.json").read_text())
    assert summary["server_distillation"]["last_round_last_step"]["loss"] == \
        nat_summary["server_distillation"]["last_round_last_step"]["loss"]
    print("\n[distill-server] per round: flower | native")
    for h, n, r, rn in zip(hist, nat_hist, kd, nat_kd):
        print(f"round {h['round']}: client train loss {h['train']['loss']!r} | {n['train']['loss']!r}; "
              f"server KD loss first {r['first']['loss']!r} | {rn['first']['loss']!r}, "
              f"last {r['last']['loss']!r} | {rn['last']['loss']!r}; "
              f"kl last {r['last']['kl']!r} | {rn['last']['kl']!r}")
    # The native runner resumes the Flower run's round-1 checkpoint to the same student and log.
    run_cli(*kd_native_args(kd_partitions, native, d / "native-resumed"), "--resume")
    cross = fedhubert.read_checkpoint(str(d / "native-resumed" / "checkpoint.safetensors"))["global"]
    assert all(np.array_equal(cross[k], ng[k]) for k in ng)
    assert [r["round"] for r in read_jsonl(d / "native-resumed" / "server_distill.jsonl")] == [1, 2]
    # The exports (fedhubert checkpoint and HF layout) hold the native run's tensors, and the
    # round checkpoint alone exports the same model with the clients' run file.
    for f in ("student.safetensors", "hf/model.safetensors"):
        assert read_safetensors(out / f) == read_safetensors(kd_native / f), f
    assert json.loads((out / "hf/config.json").read_text()) == \
        json.loads((kd_native / "hf/config.json").read_text())
    run_file = fedhubert.ServerDistillation(
        fedhubert.load_distill_run_file(str(ROOT / "configs/tiny_student.yaml"), KD_OVERRIDES),
        teacher=str(teacher), server_set=str(server_set)).client_run_file
    fedhubert.export_hf(str(out / "checkpoint.safetensors"), run_file, str(out / "hf-from-checkpoint"))
    assert (out / "hf-from-checkpoint" / "model.safetensors").read_bytes() == \
        (out / "hf" / "model.safetensors").read_bytes()


def test_server_distillation_bad_inputs_are_named(kd_partitions: Path, native: Path):
    rf = fedhubert.load_distill_run_file("tiny_student", KD_OVERRIDES)
    teacher, server_set = str(native / "model.safetensors"), str(kd_partitions / "client_2")
    with pytest.raises(ValueError, match="distillation.teacher.*/tmp/no-such-teacher.safetensors"):
        fedhubert.ServerDistillation(rf, teacher="/tmp/no-such-teacher.safetensors", server_set=server_set)
    with pytest.raises(ValueError, match="distillation.teacher: no teacher"):
        fedhubert.ServerDistillation(rf, server_set=server_set)
    with pytest.raises(ValueError, match="distillation.server_set.*/tmp/no-such-set/manifest.csv"):
        fedhubert.ServerDistillation(rf, teacher=teacher, server_set="/tmp/no-such-set")
    with pytest.raises(ValueError, match="distillation.server_set: server mode needs"):
        fedhubert.ServerDistillation(rf, teacher=teacher)
    with pytest.raises(ValueError, match="alpa"):
        fedhubert.load_distill_run_file("tiny_student", ["distillation.alpa=1"])
    with pytest.raises(ValueError, match="nope.yaml"):
        fedhubert.load_distill_run_file("/tmp/nope.yaml")
    # The ServerApp's run config keys reach the same checks.
    sys.path.insert(0, str(APP))
    try:
        from fedhubert_flower.server_app import _setup
    finally:
        sys.path.remove(str(APP))
    with pytest.raises(ValueError, match="mode='distil'"):
        _setup({"mode": "distil"})
    with pytest.raises(ValueError, match="/tmp/no-such-teacher.safetensors"):
        _setup({"mode": "distill-server", "teacher": "/tmp/no-such-teacher.safetensors",
                "server-set": server_set})
    kd = fedhubert.ServerDistillation(rf, teacher=teacher, server_set=server_set)
    assert json.loads(kd.client_run_file)["pretraining"]["vocab_size"] == 50
    kd.server(str(kd_partitions.parent / "kd-bad-inputs"), 2, False)
    with pytest.raises(RuntimeError, match="already called"):
        kd.server(str(kd_partitions.parent / "kd-bad-inputs"), 2, False)
