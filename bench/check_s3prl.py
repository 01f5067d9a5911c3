#!/usr/bin/env python3
"""Loads a `fedhubert export` directory through s3prl (the SUPERB toolkit) and compares its hidden
states with `fedhubert embed`'s output for the same 16 kHz clip.

    fedhubert export --checkpoint RUN/model.safetensors --out /tmp/hf
    python bench/check_s3prl.py /tmp/hf FILE.flac target/release/fedhubert

Paths exercised, all on the real waveform of FILE (decoded with soundfile, float32, not resampled):
  1. s3prl.hub.hf_hubert_custom(ckpt=DIR): the upstream SUPERB's run_downstream.py builds for
     `-u hf_hubert_custom -k DIR`. It reads DIR/preprocessor_config.json with
     Wav2Vec2FeatureExtractor (zero-mean/unit-variance normalisation only if `do_normalize`; s3prl
     silently falls back to facebook/hubert-base-ls960's extractor if that file is missing, so it is
     checked here) and calls HubertModel.from_pretrained(DIR)(input_values, attention_mask,
     output_hidden_states=True). Every hidden state is compared with hidden_states.i of embed.
  2. s3prl.nn.S3PRLUpstream("hf_hubert_custom", DIR): the newer API. It pads each layer to
     len(range(0, S, 320)) = ceil(S/320) frames by repeating the last frame (HuBERT's conv stack
     gives floor((S-400)/320)+1), so the first T frames are compared and the extra ones are checked
     to be copies of frame T-1.
  3. The featurizers (trainable softmax-weighted sum of all layers, as SUPERB downstreams use):
     s3prl.nn.Featurizer and the run_downstream.py one (s3prl.upstream.interfaces.Featurizer),
     compared with the same weighted sum of embed's layers; a backward pass must give the layer
     weights a finite non-zero gradient.
  4. Info only (not part of PASS/FAIL): a padded batch [clip, first half of clip] through
     S3PRLUpstream, to show what zero padding does to the shorter item.

Needs s3prl, torch/torchaudio < 2.9 (s3prl 0.4.18's hub imports torchaudio.sox_effects and
torchaudio.set_audio_backend, both removed in torchaudio 2.9), transformers, safetensors,
soundfile. Exits non-zero on missing/unexpected keys, a shape mismatch or a difference above --tol.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", category=UserWarning)  # torchaudio deprecation noise on import

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import s3prl
import s3prl.hub as hub
import torchaudio
import transformers
from s3prl.nn import Featurizer, S3PRLUpstream
from s3prl.upstream.interfaces import Featurizer as RunnerFeaturizer
from transformers import HubertModel

transformers.logging.disable_progress_bar()

STRIDE = 320  # s3prl's hf_hubert get_downsample_rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", help="directory written by `fedhubert export`")
    ap.add_argument("audio", help="16 kHz mono FLAC/WAV (e.g. a LibriSpeech utterance)")
    ap.add_argument("fedhubert", help="fedhubert binary (runs `fedhubert embed`)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed (default 1e-4)")
    ap.add_argument("--keep", help="keep embed's safetensors at this path instead of a temp file")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"s3prl {s3prl.__version__}  torch {torch.__version__}  torchaudio "
          f"{torchaudio.__version__}  transformers {transformers.__version__}")
    failures = []
    worst = 0.0

    def cmp(name, got, want):
        nonlocal worst
        if tuple(got.shape) != tuple(want.shape):
            failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            print(f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
            return
        d = (got - want).abs().max().item()
        worst = max(worst, d)
        if not d <= a.tol:
            failures.append(f"{name}: {d:.3e}")
        print(f"{name}: shape {tuple(got.shape)} max abs diff {d:.3e}")

    # --- reference: fedhubert embed
    tmp = tempfile.TemporaryDirectory()
    emb = a.keep or os.path.join(tmp.name, "emb.safetensors")
    subprocess.run([a.fedhubert, "embed", "--checkpoint", a.export_dir, "--audio", a.audio,
                    "--out", emb], check=True)
    ref = load_file(emb)
    n_hs = sum(1 for k in ref if k.startswith("hidden_states."))
    ref_hs = [ref[f"hidden_states.{i}"][0] for i in range(n_hs)]  # [T, H] each
    T = ref_hs[0].shape[0]

    # --- the waveform s3prl gets: the file as decoded, no normalisation
    wav, sr = sf.read(a.audio, dtype="float32", always_2d=True)
    if sr != 16000 or wav.shape[1] != 1:
        print(f"{a.audio}: {sr} Hz, {wav.shape[1]} channel(s); give a 16 kHz mono file")
        return 2
    wav = torch.from_numpy(np.ascontiguousarray(wav[:, 0]))
    S = wav.shape[0]
    with open(os.path.join(a.export_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    with open(os.path.join(a.export_dir, "config.json")) as f:
        cfg = json.load(f)
    iv = ref["input_values"][0]
    print(f"audio: {S} samples ({S / 16000:.2f} s); embed: {n_hs} hidden states x {T} frames; "
          f"preprocessor do_normalize={pre.get('do_normalize')}; "
          f"max |raw - embed input_values| {(iv - wav).abs().max().item():.3e}"
          + (" (embed normalised it)" if pre.get("do_normalize") else ""))

    # --- 1. hub.hf_hubert_custom (run_downstream.py -u hf_hubert_custom -k DIR)
    print("\n[1] s3prl.hub.hf_hubert_custom(ckpt=DIR)")
    expert = hub.hf_hubert_custom(ckpt=a.export_dir)
    expert.eval()
    ex = expert.extracter
    ex_cfg = {k: getattr(ex, k) for k in ("do_normalize", "sampling_rate", "padding_value")}
    ours = {k: pre.get(k) for k in ex_cfg}
    print(f"feature extractor: {ex_cfg} (from our preprocessor_config.json: {ex_cfg == ours})")
    if ex_cfg != ours:
        failures.append("s3prl did not use our preprocessor_config.json")
    _, info = HubertModel.from_pretrained(a.export_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    print(f"HubertModel.from_pretrained: missing/unexpected/mismatched: {bad or 'none'}")
    if bad:
        failures.append(f"loading info {bad}")
    with torch.no_grad():
        hs = expert([wav])["hidden_states"]
    print(f"{len(hs)} hidden states (embed: {n_hs}); downsample rate "
          f"{expert.get_downsample_rates('hidden_states')}")
    if len(hs) != n_hs:
        failures.append(f"{len(hs)} hidden states, embed has {n_hs}")
    for i, (h, r) in enumerate(zip(hs, ref_hs)):
        cmp(f"hidden_states.{i}", h[0], r)
    cmp("hidden_states[-1] vs last_hidden_state", hs[-1][0], ref["last_hidden_state"][0])

    # --- 2. S3PRLUpstream
    print('\n[2] s3prl.nn.S3PRLUpstream("hf_hubert_custom", path_or_url=DIR)')
    up = S3PRLUpstream("hf_hubert_custom", path_or_url=a.export_dir)
    up.eval()
    with torch.no_grad():
        all_hs, all_lens = up(wav[None], torch.LongTensor([S]))
    Tp = all_hs[0].shape[1]
    print(f"num_layers {up.num_layers}, hidden_sizes {up.hidden_sizes}, downsample_rates "
          f"{up.downsample_rates}; {Tp} frames, hs_len {all_lens[0].tolist()} "
          f"(HuBERT conv frames {T}; s3prl appends {Tp - T} copy/copies of the last frame)")
    for i, (h, r) in enumerate(zip(all_hs, ref_hs)):
        cmp(f"layer {i} [:{T}]", h[0, :T], r)
        if Tp > T:
            cmp(f"layer {i} [{T}:] == frame {T - 1}", h[0, T:], h[0, T - 1:T].expand(Tp - T, -1))

    # --- 3. featurizers (weighted sum over layers)
    stack = torch.stack(ref_hs)  # [L, T, H]
    print("\n[3a] s3prl.nn.Featurizer(upstream)")
    fz = Featurizer(up)
    for tag in ("initial weights (uniform)", "random weights"):
        if tag.startswith("random"):
            with torch.no_grad():
                fz.weights.normal_()
        with torch.no_grad():
            w_hs, w_len = fz(all_hs, all_lens)
        want = (F.softmax(fz.weights.detach(), -1)[:, None, None] * stack).sum(0)
        cmp(f"weighted sum, {tag} [:{T}]", w_hs[0, :T], want)
    fz.zero_grad()
    fz(all_hs, all_lens)[0].pow(2).mean().backward()  # upstream frozen, as in SUPERB
    g = fz.weights.grad
    print(f"output_size {fz.output_size}, downsample_rate {fz.downsample_rate}, "
          f"layer-weight grad {g.tolist()}")
    if g is None or not torch.isfinite(g).all() or g.abs().max() == 0:
        failures.append("featurizer weights got no usable gradient")

    print("\n[3b] s3prl.upstream.interfaces.Featurizer (run_downstream.py's)")
    rfz = RunnerFeaturizer(expert, feature_selection="hidden_states", upstream_device="cpu")
    with torch.no_grad():
        rfz.weights.normal_()
        feats = rfz([wav], expert([wav]))
    want = (F.softmax(rfz.weights, -1)[:, None, None] * stack).sum(0)
    print(f"output_dim {rfz.output_dim}, downsample_rate {rfz.downsample_rate}, "
          f"layer_num {rfz.layer_num}")
    cmp("weighted sum, random weights", feats[0], want)

    # --- 4. info: padded batch
    print("\n[4] info: S3PRLUpstream on the padded batch [clip, clip[:S/2]] (not in PASS/FAIL)")
    half = S // 2
    batch = torch.stack([wav, F.pad(wav[:half], (0, S - half))])
    with torch.no_grad():
        b_hs, b_lens = up(batch, torch.LongTensor([S, half]))
        s_hs, s_lens = up(wav[None, :half], torch.LongTensor([half]))
    n = int(s_lens[0][0])
    d_long = max((b[0, :T] - r).abs().max().item() for b, r in zip(b_hs, ref_hs))
    d_short = [(b[1, :n] - s[0, :n]).abs().max().item() for b, s in zip(b_hs, s_hs)]
    print(f"longer item vs embed: max abs diff {d_long:.3e}; shorter item ({n} frames) vs the "
          f"same clip alone, per layer: {', '.join(f'{d:.3e}' for d in d_short)}")
    if cfg.get("feat_extract_norm") == "group":
        print("  (feat_extract_norm=group: the first conv's GroupNorm normalises over the padded "
              "zeros too, as for facebook/hubert-base-ls960; s3prl passes attention_mask anyway)")

    ok = not failures
    print()
    print("PASS" if ok else "FAIL", f"(worst max abs diff {worst:.3e}, tol {a.tol:.0e})")
    for f_ in failures:
        print("  ", f_)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
