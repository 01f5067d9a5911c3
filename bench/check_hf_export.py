#!/usr/bin/env python3
"""Loads a `fedhubert export` directory with transformers' HubertModel.from_pretrained and compares
its hidden states with `fedhubert embed`'s output for the same input.

    fedhubert export --checkpoint RUN/model.safetensors --out /tmp/hf
    fedhubert embed --checkpoint /tmp/hf --audio FILE.flac --out /tmp/emb.safetensors
    python bench/check_hf_export.py /tmp/hf /tmp/emb.safetensors

Needs torch, transformers and safetensors (e.g. the venv of bench/pytorch_reference.py).
Exits non-zero on missing/unexpected keys or a difference above 1e-4.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import HubertModel


def main() -> int:
    hf_dir, emb = sys.argv[1], sys.argv[2]
    model, info = HubertModel.from_pretrained(hf_dir, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    print(f"from_pretrained({hf_dir}): missing/unexpected/mismatched: {bad or 'none'}")
    ref = load_file(emb)
    with torch.no_grad():
        out = model(ref["input_values"], output_hidden_states=True)
    worst = 0.0
    for i, h in enumerate(out.hidden_states):
        d = (h - ref[f"hidden_states.{i}"]).abs().max().item()
        worst = max(worst, d)
        print(f"hidden_states.{i}: shape {tuple(h.shape)} max abs diff {d:.3e}")
    d = (out.last_hidden_state - ref["last_hidden_state"]).abs().max().item()
    worst = max(worst, d)
    print(f"last_hidden_state: max abs diff {d:.3e}")
    ok = not bad and worst <= 1e-4
    print("OK" if ok else "FAILED", f"(worst {worst:.3e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
