#!/usr/bin/env python3
"""Training-dynamics parity, PyTorch side (BENCHMARKS.md, "Training dynamics: fedhubert vs
PyTorch"): trains the model `parity_trace` exported on exactly its batches, crops and masks, with
transformers' HubertModel, the fairseq HuBERT loss, torch's global-norm clipping and
torch.optim.AdamW, and compares the per-step loss and masked accuracy with ours.

    cargo build --workspace --examples
    target/debug/examples/parity_trace /tmp/parity_tiny tiny 50
    python3 bench/pytorch_train_parity.py /tmp/parity_tiny

The loss is fairseq's (fairseq/models/hubert/hubert.py `forward`, hubert_criterion.py):
conv features with their gradient scaled by `feature_grad_mult`, the L2 feature penalty
(x `feature_pen_weight`) on the label-trimmed features, layer norm + projection, the mask
replaced by `masked_spec_embed`, the encoder, `final_proj`, cosine similarity to the label
embeddings / `logit_temp`, cross-entropy over the masked frames. Runs in float32 on the CPU;
creates .venv-bench like bench/pytorch_reference.py.
"""

import json
import os
import sys
from pathlib import Path

from venv_bootstrap import ensure_venv

PACKAGES = ["torch==2.11.0", "transformers", "numpy", "soundfile", "safetensors"]


def main():
    ensure_venv(PACKAGES, "import torch, transformers, soundfile, safetensors")
    import numpy as np
    import soundfile as sf
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import HubertModel

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    d = Path(sys.argv[1])
    trace = json.loads((d / "trace.json").read_text())
    pre = trace["pretrain_config"]
    tc = trace["train_config"]
    model = HubertModel.from_pretrained(str(d / "init"), attn_implementation="eager")
    model.train()
    head = load_file(str(d / "init" / "pretraining_head.safetensors"))
    final_proj = torch.nn.Linear(*reversed(head["final_proj.weight"].shape))
    final_proj.weight.data.copy_(head["final_proj.weight"])
    final_proj.bias.data.copy_(head["final_proj.bias"])
    label_embs = torch.nn.Parameter(head["label_embs_concat"].clone())
    params = list(model.parameters()) + list(final_proj.parameters()) + [label_embs]
    b1, b2 = tc["adam_betas"]
    opt = torch.optim.AdamW(params, lr=tc["learning_rate"], betas=(b1, b2), eps=tc["adam_eps"],
                            weight_decay=tc["weight_decay"])
    waves = {i: sf.read(p, dtype="float32")[0] for i, p in trace["audio"].items()}
    ratio = pre["label_rate"] * 320 / pre["sample_rate"]
    gm = pre["feature_grad_mult"]

    def micro_loss(b):
        wav = torch.from_numpy(np.stack([waves[i][s:s + b["samples"]]
                                         for i, s in zip(b["ids"], b["starts"])]))
        feats = model.feature_extractor(wav)  # [B, C, T]
        feats = feats * gm + (feats * (1.0 - gm)).detach()  # GradMultiply
        n_lab = max(len(l) for l in b["labels"])
        t = feats.shape[2]
        if ratio * t > n_lab:
            t = int(n_lab / ratio)
        feats = feats[..., :t]
        pen = feats.float().pow(2).mean()
        hidden = model.feature_projection(feats.transpose(1, 2))
        if isinstance(hidden, tuple):  # older transformers return (hidden, normed features)
            hidden = hidden[0]
        mask = torch.tensor(b["mask"], dtype=torch.bool)
        assert mask.shape == hidden.shape[:2], (mask.shape, hidden.shape)
        hidden = hidden.clone()
        hidden[mask] = model.masked_spec_embed.to(hidden.dtype)
        x = model.encoder(hidden).last_hidden_state
        idx = (torch.arange(t, dtype=torch.float32) * ratio).long()
        # A label window may be a frame short of the longest: those frames have no target.
        target = torch.full((len(b["labels"]), t), -1, dtype=torch.long)
        for row, lab in enumerate(b["labels"]):
            ok = idx < len(lab)
            target[row, ok] = torch.tensor(lab)[idx[ok]]
        mask = mask & (target >= 0)
        proj = final_proj(x[mask])
        logits = F.cosine_similarity(proj.unsqueeze(1), label_embs.unsqueeze(0), dim=-1, eps=1e-8)
        logits = logits / pre["logit_temp"]
        ce = F.cross_entropy(logits, target[mask], reduction="sum")
        loss = ce / mask.sum() * pre["pred_masked_weight"] + pen * pre["feature_pen_weight"]
        correct = (logits.argmax(-1) == target[mask]).sum().item()
        return loss, correct, int(mask.sum())

    rows = []
    for k, step in enumerate(trace["steps"]):
        for g in opt.param_groups:
            g["lr"] = step["lr"]
        opt.zero_grad()
        n = len(step["batches"])
        total, correct, count = 0.0, 0, 0
        for b in step["batches"]:
            loss, c, m = micro_loss(b)
            (loss / n).backward()
            total += loss.item() / n
            correct, count = correct + c, count + m
        norm = torch.nn.utils.clip_grad_norm_(params, tc["clip_norm"]).item()
        opt.step()
        rows.append({"step": k, "loss": total, "acc_masked": correct / max(count, 1),
                     "grad_norm": norm, "ours_loss": step["loss"],
                     "ours_acc_masked": step["acc_masked"], "ours_grad_norm": step["grad_norm"]})
    rel = [abs(r["loss"] - r["ours_loss"]) / abs(r["ours_loss"]) for r in rows]
    print(f"{'step':>4} {'torch loss':>11} {'ours loss':>11} {'rel diff':>9} "
          f"{'torch acc':>9} {'ours acc':>9} {'torch |g|':>10} {'ours |g|':>10}")
    for r, e in zip(rows, rel):
        print(f"{r['step']:>4} {r['loss']:>11.5f} {r['ours_loss']:>11.5f} {e:>9.2e} "
              f"{r['acc_masked']:>9.3f} {r['ours_acc_masked']:>9.3f} "
              f"{r['grad_norm']:>10.4f} {r['ours_grad_norm']:>10.4f}")
    summary = {"preset": trace["preset"], "steps": len(rows),
               "max_rel_loss_diff_first_10": max(rel[:10]), "max_rel_loss_diff_all": max(rel),
               "rows": rows}
    (d / "torch_parity.json").write_text(json.dumps(summary, indent=1))
    print(f"max relative loss difference: first 10 steps {summary['max_rel_loss_diff_first_10']:.2e},"
          f" all {len(rows)} steps {summary['max_rel_loss_diff_all']:.2e}")


if __name__ == "__main__":
    main()
