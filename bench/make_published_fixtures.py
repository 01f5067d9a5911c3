#!/usr/bin/env python3
"""Writes tiny HuBERT checkpoints in the published formats, plus reference outputs, to
assets/fixtures/published_hubert_tiny/ (the test inputs of the checkpoint importer).

    python3 bench/make_published_fixtures.py

Run with any python3: it re-executes itself inside .venv-bench at the repository root (created,
and torch/torchaudio/transformers/safetensors/numpy installed from PyPI, when missing).
Deterministic: fixed seeds, one CPU thread; a second run writes the same bytes.

One tiny architecture, built with torchaudio.models.hubert_pretrain_model: conv feature layers
[(32,10,5)] + [(32,3,2)]*4 + [(32,2,2)]*2, encoder_embed_dim 64, 1 attention head (head dim 64),
2 layers, FFN 128, positional conv kernel 16 / groups 4, num_classes 20, final_dim 32, every
dropout and LayerDrop 0. Two variants:

- postnorm: extractor_mode group_norm, no conv bias, post-LayerNorm transformer (the Base layout);
- prenorm:  extractor_mode layer_norm, conv bias, pre-LayerNorm transformer (the Large layout).

Files (see the README.md written next to them):

- torchaudio_{postnorm,prenorm}.pt: torch.save(HuBERTPretrainModel.state_dict()).
- fairseq_postnorm.pt: the postnorm weights under fairseq HuBERT names, in the layout of
  fairseq's hubert_base_ls960.pt (args / cfg / model / optimizer_history / extra_state /
  task_state / last_optimizer_state). The names come from inverting torchaudio's own fairseq
  importer (torchaudio/models/wav2vec2/utils/import_fairseq.py), checked key by key and by a real
  load through torchaudio's _convert_state_dict.
- s3prl_postnorm.pt: the same weights in s3prl's converted-upstream layout
  (s3prl/upstream/hubert/convert.py load_and_convert_fairseq_ckpt).
- malicious_root.pt / malicious_extra.pt: pickles that call os.system when unpickled. NEVER open
  them with torch.load / pickle.load. This script only inspects their opcodes (pickletools).
- reference.safetensors: input_values [2, 16000] and, per variant, the transformers HubertModel
  outputs on the same weights (and torchaudio's per-layer outputs, checked to agree).
- hf_config_{postnorm,prenorm}.json: the HubertConfig used for that HF model.
"""

import argparse
import collections
import hashlib
import io
import json
import os
import pickletools
import re
import sys
import types
import zipfile
from pathlib import Path

from venv_bootstrap import ensure_venv

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "assets" / "fixtures" / "published_hubert_tiny"
PACKAGES = ["torch==2.11.0", "torchaudio==2.11.0", "transformers", "safetensors", "numpy"]
PROBE = "import torch, torchaudio, transformers, safetensors, numpy"

CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
CONV_STR = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
EMBED, HEADS, LAYERS, FFN = 64, 1, 2, 128
POS_K, POS_G = 16, 4
NUM_CLASSES, FINAL_DIM = 20, 32
SAMPLES = 16000
VARIANTS = {
    # name: (extractor_mode, conv_bias, layer_norm_first)
    "postnorm": ("group_norm", False, False),
    "prenorm": ("layer_norm", True, True),
}
SEEDS = {"postnorm": 1001, "prenorm": 2002, "input": 3003}
STD = 0.15
TOL = 1e-5
PICKLE_CMD = "touch /tmp/fedhubert-pickle-was-executed"


# --------------------------------------------------------------------------------------------
# torchaudio model
# --------------------------------------------------------------------------------------------
def build_torchaudio(variant):
    import torch
    from torchaudio.models import hubert_pretrain_model

    mode, bias, lnf = VARIANTS[variant]
    model = hubert_pretrain_model(
        extractor_mode=mode,
        extractor_conv_layer_config=CONV,
        extractor_conv_bias=bias,
        encoder_embed_dim=EMBED,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=POS_K,
        encoder_pos_conv_groups=POS_G,
        encoder_num_layers=LAYERS,
        encoder_num_heads=HEADS,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=FFN,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=lnf,
        encoder_layer_drop=0.0,
        mask_prob=0.8,
        mask_selection="static",
        mask_other=0.0,
        mask_length=10,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_prob=0.0,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        mask_channel_length=10,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        num_classes=NUM_CLASSES,
        final_dim=FINAL_DIM,
        feature_grad_mult=0.1,
    )
    # Random, non-trivial values everywhere (norm weights and weight-norm g around 1, everything
    # else around 0), so that any swapped, transposed or skipped tensor changes the outputs.
    gen = torch.Generator().manual_seed(SEEDS[variant])
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * STD
            is_scale = name.endswith("norm.weight") or name.endswith("original0")
            p.copy_(1.0 + noise if is_scale else noise)
    return model.eval()


# --------------------------------------------------------------------------------------------
# torchaudio <-> fairseq names
# --------------------------------------------------------------------------------------------
def ta_to_fairseq(ta_key, extractor_mode):
    """torchaudio HuBERTPretrainModel key -> fairseq HubertModel key (inverse of torchaudio's
    import_fairseq._map_key, plus the pretraining head that torchaudio's importer drops)."""
    heads = {
        "mask_generator.mask_embedding": "mask_emb",
        "logit_generator.final_proj.weight": "final_proj.weight",
        "logit_generator.final_proj.bias": "final_proj.bias",
        "logit_generator.label_embeddings": "label_embs_concat",
    }
    if ta_key in heads:
        return heads[ta_key]
    assert ta_key.startswith("wav2vec2."), ta_key
    k = ta_key[len("wav2vec2."):]
    rules = [
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)$",
         r"feature_extractor.conv_layers.\1.0.\2"),
        (r"encoder\.feature_projection\.projection\.(weight|bias)$", r"post_extract_proj.\1"),
        (r"encoder\.feature_projection\.layer_norm\.(weight|bias)$", r"layer_norm.\1"),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.bias$", r"encoder.pos_conv.0.bias"),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$",
         r"encoder.pos_conv.0.weight_g"),
        (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$",
         r"encoder.pos_conv.0.weight_v"),
        (r"encoder\.transformer\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
        (r"encoder\.transformer\.layers\.(\d+)\.attention\.((q|k|v|out)_proj\.(weight|bias))$",
         r"encoder.layers.\1.self_attn.\2"),
        (r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.(weight|bias)$",
         r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)$",
         r"encoder.layers.\1.fc1.\2"),
        (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)$",
         r"encoder.layers.\1.fc2.\2"),
        (r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$",
         r"encoder.layers.\1.final_layer_norm.\2"),
    ]
    m = re.match(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)$", k)
    if m:
        i, wb = m.groups()
        if extractor_mode == "group_norm":  # fairseq "default": GroupNorm is module 2 of block 0
            assert i == "0", k
            return f"feature_extractor.conv_layers.0.2.{wb}"
        # fairseq "layer_norm": module 2 = Sequential(TransposeLast, Fp32LayerNorm, TransposeLast)
        return f"feature_extractor.conv_layers.{i}.2.1.{wb}"
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    raise ValueError(f"no fairseq name for {ta_key}")


def fairseq_order(extractor_mode, conv_bias):
    """fairseq HubertModel.state_dict() key order (module registration order)."""
    keys = ["mask_emb", "label_embs_concat"]  # HubertModel's own parameters come first
    for i in range(len(CONV)):
        keys.append(f"feature_extractor.conv_layers.{i}.0.weight")
        if conv_bias:
            keys.append(f"feature_extractor.conv_layers.{i}.0.bias")
        if extractor_mode == "group_norm" and i == 0:
            keys += [f"feature_extractor.conv_layers.0.2.{x}" for x in ("weight", "bias")]
        elif extractor_mode == "layer_norm":
            keys += [f"feature_extractor.conv_layers.{i}.2.1.{x}" for x in ("weight", "bias")]
    keys += ["post_extract_proj.weight", "post_extract_proj.bias"]
    # legacy torch.nn.utils.weight_norm: deletes `weight`, registers weight_g then weight_v
    keys += ["encoder.pos_conv.0.bias", "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"]
    for n in range(LAYERS):
        p = f"encoder.layers.{n}."
        for sub in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            keys += [p + sub + ".weight", p + sub + ".bias"]
    keys += ["encoder.layer_norm.weight", "encoder.layer_norm.bias"]
    keys += ["layer_norm.weight", "layer_norm.bias"]
    keys += ["final_proj.weight", "final_proj.bias"]
    return keys


def with_metadata(od):
    """Attach the `_metadata` attribute nn.Module.state_dict() puts on its OrderedDict (fairseq
    keeps it through utils.move_to_cpu, so real checkpoints pickle it as the OrderedDict's BUILD
    state)."""
    prefixes = {""}
    for k in od:
        parts = k.split(".")[:-1]
        for j in range(1, len(parts) + 1):
            prefixes.add(".".join(parts[:j]))
    meta = collections.OrderedDict((p, {"version": 1}) for p in sorted(prefixes))
    od._metadata = meta
    return od


def to_fairseq_state_dict(ta_sd, variant):
    import torch
    from torchaudio.models import wav2vec2_model
    from torchaudio.models.wav2vec2.utils import import_fairseq as tif

    mode, bias, lnf = VARIANTS[variant]
    mapped = {ta_to_fairseq(k, mode): k for k in ta_sd}
    assert len(mapped) == len(ta_sd), "fairseq names collide"
    order = fairseq_order(mode, bias)
    assert set(order) == set(mapped), (set(order) ^ set(mapped))
    fs_sd = collections.OrderedDict((fk, ta_sd[mapped[fk]].clone()) for fk in order)

    # 1. Key by key: torchaudio's own fairseq mapping must send every fairseq key back.
    head = {"mask_emb": None, "final_proj.weight": None, "final_proj.bias": None,
            "label_embs_concat": "label_embs_concat"}
    for fk, tk in mapped.items():
        got = tif._map_key(fk)
        if fk in head:
            # torchaudio's importer builds a Wav2Vec2Model (no pretraining head): it returns None
            # for mask_emb / final_proj.* and passes label_embs_concat through unchanged (then
            # drops it as an unexpected key, strict=False). Our mapping for these three is
            # mask_emb <-> mask_generator.mask_embedding, final_proj.* <->
            # logit_generator.final_proj.*, label_embs_concat <-> logit_generator.label_embeddings.
            assert got == head[fk], (fk, got)
            continue
        want = tk[len("wav2vec2."):]
        # torchaudio maps to the legacy weight_g/weight_v names; the load-state-dict hook of
        # torch.nn.utils.parametrizations.weight_norm renames them to original0/original1.
        want = want.replace("parametrizations.weight.original0", "weight_g")
        want = want.replace("parametrizations.weight.original1", "weight_v")
        assert got == want, (fk, got, want)

    # 2. A real load through torchaudio's importer path into a fresh Wav2Vec2Model.
    fresh = wav2vec2_model(
        extractor_mode=mode, extractor_conv_layer_config=CONV, extractor_conv_bias=bias,
        encoder_embed_dim=EMBED, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=POS_K,
        encoder_pos_conv_groups=POS_G, encoder_num_layers=LAYERS, encoder_num_heads=HEADS,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=FFN,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=lnf,
        encoder_layer_drop=0.0, aux_num_out=None)
    res = fresh.load_state_dict(tif._convert_state_dict(fs_sd), strict=False)
    assert not res.missing_keys, res.missing_keys
    assert list(res.unexpected_keys) == ["label_embs_concat"], res.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ta_sd["wav2vec2." + k]), k
    return with_metadata(fs_sd)


# --------------------------------------------------------------------------------------------
# fairseq / s3prl checkpoint dicts
# --------------------------------------------------------------------------------------------
def model_cfg():
    return {
        "_name": "hubert",
        "label_rate": 50.0,
        "extractor_mode": "default",
        "encoder_layers": LAYERS,
        "encoder_embed_dim": EMBED,
        "encoder_ffn_embed_dim": FFN,
        "encoder_attention_heads": HEADS,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "dropout_input": 0.0,
        "dropout_features": 0.0,
        "final_dim": FINAL_DIM,
        "untie_final_proj": False,
        "layer_norm_first": False,
        "conv_feature_layers": CONV_STR,
        "conv_bias": False,
        "logit_temp": 0.1,
        "target_glu": False,
        "feature_grad_mult": 0.1,
        "mask_length": 10,
        "mask_prob": 0.8,
        "mask_selection": "static",
        "mask_other": 0.0,
        "no_mask_overlap": False,
        "mask_min_space": 1,
        "mask_channel_length": 10,
        "mask_channel_prob": 0.0,
        "mask_channel_selection": "static",
        "mask_channel_other": 0.0,
        "no_mask_channel_overlap": False,
        "mask_channel_min_space": 1,
        "conv_pos": POS_K,
        "conv_pos_groups": POS_G,
        "conv_pos_batch_norm": False,
        "latent_temp": [2.0, 0.5, 0.999995],
        "skip_masked": False,
        "skip_nomask": False,
        "checkpoint_activations": False,
        "required_seq_len_multiple": 2,
        "depthwise_conv_kernel_size": 31,
        "attn_type": "",
        "pos_enc_type": "abs",
        "fp16": False,
    }


def task_cfg():
    return {
        "_name": "hubert_pretraining",
        "data": "/inert/manifest",
        "fine_tuning": False,
        "labels": ["km"],
        "label_dir": "/inert/labels",
        "label_rate": 50.0,
        "sample_rate": 16000,
        "normalize": False,
        "enable_padding": False,
        "max_keep_size": None,
        "max_sample_size": 250000,
        "min_sample_size": 32000,
        "single_target": False,
        "random_crop": True,
        "pad_audio": False,
    }


def dictionary_symbols():
    # fairseq's Dictionary always starts with the 4 specials, and HubertModel sizes
    # label_embs_concat as sum(len(d)), specials included (hubert_base_ls960: 500 clusters ->
    # [504, 256]). num_classes 20 therefore means 4 specials + 16 cluster ids here.
    return ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(NUM_CLASSES - 4)]


def fake_fairseq_dictionary_class():
    """A plain class that pickles as fairseq.data.dictionary.Dictionary (fairseq not needed)."""
    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    mods = {}
    for n in names:
        mods[n] = sys.modules.get(n) or types.ModuleType(n)
        sys.modules[n] = mods[n]
    mods["fairseq"].data = mods["fairseq.data"]
    mods["fairseq.data"].dictionary = mods["fairseq.data.dictionary"]

    class Dictionary:
        pass

    Dictionary.__module__ = "fairseq.data.dictionary"
    Dictionary.__qualname__ = "Dictionary"
    mods["fairseq.data.dictionary"].Dictionary = Dictionary
    return Dictionary


def make_dictionary():
    Dictionary = fake_fairseq_dictionary_class()
    d = Dictionary()
    syms = dictionary_symbols()
    d.bos_word, d.unk_word, d.pad_word, d.eos_word = "<s>", "<unk>", "<pad>", "</s>"
    d.symbols = syms
    d.count = [1, 1, 1, 1] + [1000 + 37 * i for i in range(len(syms) - 4)]
    d.indices = {s: i for i, s in enumerate(syms)}
    d.bos_index, d.pad_index, d.eos_index, d.unk_index = 0, 1, 2, 3
    d.nspecial = 4
    return d


def fairseq_checkpoint(fs_sd):
    import numpy as np

    cfg = {
        "_name": None,
        "common": {"_name": None, "fp16": True, "log_format": "json", "log_interval": 200,
                   "seed": 1337, "cpu": False},
        "distributed_training": {"_name": None, "distributed_world_size": 32},
        "dataset": {"_name": None, "num_workers": 6, "max_tokens": 1400000},
        "optimization": {"_name": None, "max_update": 400000, "lr": [0.0005],
                         "clip_norm": 10.0, "update_freq": [1]},
        "checkpoint": {"_name": None, "save_dir": "/inert/checkpoints"},
        "model": model_cfg(),
        "task": task_cfg(),
        "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                      "loss_weights": [10.0], "log_keys": []},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06,
                      "weight_decay": 0.01},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 32000},
    }
    return {
        "args": argparse.Namespace(arch="hubert", task="hubert_pretraining", seed=1337,
                                   note="inert legacy args object"),
        "cfg": cfg,
        "model": fs_sd,
        "optimizer_history": [{
            "criterion_name": "HubertCriterion",
            "optimizer_name": "FairseqAdam",
            "lr_scheduler_state": {"best": None},
            "num_updates": 400000,
        }],
        "extra_state": {"epoch": 1, "previous_best": np.float64(1.5), "metrics": {}},
        "task_state": {"dictionaries": [make_dictionary()]},
        "last_optimizer_state": None,
    }


def s3prl_checkpoint(fs_sd):
    # keys exactly as s3prl/upstream/hubert/convert.py load_and_convert_fairseq_ckpt writes them
    return {
        "task_cfg": task_cfg(),
        "model_cfg": model_cfg(),
        "model_weight": fs_sd,
        "dictionaries_symbols": [dictionary_symbols()],
    }


class RunsShellOnUnpickle:
    """Unpickling this calls os.system (the classic malicious-checkpoint payload)."""

    def __reduce__(self):
        return (os.system, (PICKLE_CMD,))


def malicious_extra(fs_sd):
    return {
        "args": None,
        "cfg": {"_name": None, "model": model_cfg(), "task": task_cfg()},
        "model": collections.OrderedDict([("mask_emb", fs_sd["mask_emb"][:4].clone())]),
        "optimizer_history": [],
        "extra_state": RunsShellOnUnpickle(),
        "last_optimizer_state": None,
    }


# --------------------------------------------------------------------------------------------
# pickle inspection (never unpickles)
# --------------------------------------------------------------------------------------------
def pickle_globals(path):
    """(archive prefix, sorted set of 'module name' strings of GLOBAL/STACK_GLOBAL opcodes)."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkl) == 1, z.namelist()
        data = z.read(pkl[0])
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]} {strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return pkl[0].split("/")[0], sorted(found), data


# --------------------------------------------------------------------------------------------
# HuggingFace view
# --------------------------------------------------------------------------------------------
def hf_config(variant):
    from transformers import HubertConfig

    mode, bias, lnf = VARIANTS[variant]
    return HubertConfig(
        architectures=["HubertModel"],
        hidden_size=EMBED,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        hidden_act="gelu",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_layer_norm=True,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        layer_norm_eps=1e-5,
        feat_extract_norm="group" if mode == "group_norm" else "layer",
        feat_extract_activation="gelu",
        conv_dim=[c for c, _, _ in CONV],
        conv_kernel=[k for _, k, _ in CONV],
        conv_stride=[s for _, _, s in CONV],
        conv_bias=bias,
        num_conv_pos_embeddings=POS_K,
        num_conv_pos_embedding_groups=POS_G,
        do_stable_layer_norm=lnf,
        mask_time_prob=0.05,  # > 0, so HubertModel has masked_spec_embed (unused in eval)
    )


def ta_to_hf(ta_key):
    """torchaudio key -> transformers HubertModel key (None: no HF counterpart)."""
    if ta_key == "mask_generator.mask_embedding":
        return "masked_spec_embed"
    if ta_key.startswith("logit_generator."):
        return None  # HubertModel has no pretraining head (final_proj / label embeddings)
    k = ta_key[len("wav2vec2."):]
    k = k.replace("encoder.feature_projection.", "feature_projection.")
    k = k.replace("encoder.transformer.", "encoder.")
    return k  # conv_layers.i.{conv,layer_norm}, pos_conv_embed.conv.parametrizations..., layers.N.*


def run_variant(variant, model, x):
    import torch
    from transformers import HubertModel

    config = hf_config(variant)
    hf = HubertModel(config).eval()
    ta_sd = model.state_dict()
    hf_sd = {ta_to_hf(k): v for k, v in ta_sd.items() if ta_to_hf(k) is not None}
    res = hf.load_state_dict(hf_sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res

    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        hf_feat = hf.feature_extractor(x).transpose(1, 2)
        ta_feat, _ = model.wav2vec2.feature_extractor(x, None)
        ta_layers, _ = model.wav2vec2.extract_features(x)
        ta_final, _ = model.wav2vec2(x)  # Wav2Vec2Model.forward: the encoder's output
        ta_final_ln = model.wav2vec2.encoder.transformer.layer_norm(ta_layers[-1])

    hs = list(out.hidden_states)
    assert len(hs) == LAYERS + 1 and len(ta_layers) == LAYERS
    diffs = {"extract_features": (ta_feat - hf_feat).abs().max().item()}
    for i, t in enumerate(ta_layers):
        diffs[f"torchaudio_layer.{i} vs hidden_states.{i + 1}"] = (t - hs[i + 1]).abs().max().item()
    diffs["torchaudio wav2vec2(x) vs last_hidden_state"] = (
        (ta_final - out.last_hidden_state).abs().max().item())
    if variant == "prenorm":
        # Pre-LN: the encoder applies its final layer_norm after the last layer. transformers
        # 5.x records hidden_states with hooks on the layers, so hidden_states[-1] is the RAW
        # last-layer output (== torchaudio's extract_features()[-1]), while last_hidden_state
        # is layer_norm(that) (== torchaudio's Wav2Vec2Model.forward output). (transformers 4.x
        # put the normed tensor in hidden_states[-1].)
        diffs["LN(torchaudio_layer.last) vs last_hidden_state"] = (
            (ta_final_ln - out.last_hidden_state).abs().max().item())
        diffs["hidden_states[-1] vs last_hidden_state (expected to differ)"] = (
            (hs[-1] - out.last_hidden_state).abs().max().item())
    else:
        diffs["hidden_states[-1] vs last_hidden_state"] = (
            (hs[-1] - out.last_hidden_state).abs().max().item())
    for name, d in diffs.items():
        if "expected to differ" in name:
            assert d > 1e-3, (variant, name, d)
        else:
            assert d <= TOL, (variant, name, d)

    tensors = {f"{variant}.extract_features": hf_feat,
               f"{variant}.last_hidden_state": out.last_hidden_state}
    for i, h in enumerate(hs):
        tensors[f"{variant}.hidden_states.{i}"] = h
    for i, t in enumerate(ta_layers):
        tensors[f"{variant}.torchaudio_layer.{i}"] = t
    return config, tensors, diffs


def make_input():
    import torch

    gen = torch.Generator().manual_seed(SEEDS["input"])
    t = torch.arange(SAMPLES, dtype=torch.float32) / 16000.0
    row0 = 0.1 * torch.randn(SAMPLES, generator=gen)
    row1 = 0.3 * torch.sin(2 * torch.pi * 220.0 * t) + 0.05 * torch.randn(SAMPLES, generator=gen)
    return torch.stack([row0, row1]).contiguous()


# --------------------------------------------------------------------------------------------
README = """# Tiny HuBERT checkpoints in the published formats

Written by `bench/make_published_fixtures.py` (`python3 bench/make_published_fixtures.py`; it
re-executes inside `.venv-bench`). Made with torch {torch}, torchaudio {torchaudio},
transformers {transformers}, numpy {numpy}, safetensors {safetensors}. Deterministic (fixed seeds,
one CPU thread): a rerun writes byte-identical files. All tensors are float32.

One random architecture, built with `torchaudio.models.hubert_pretrain_model`: conv feature layers
`[(32,10,5)] + [(32,3,2)]*4 + [(32,2,2)]*2`, encoder_embed_dim 64, 1 attention head (head dim 64),
2 layers, FFN 128, positional conv kernel 16 / groups 4, num_classes 20, final_dim 32, dropouts
and LayerDrop 0. Norm weights and the weight-norm g are 1 + N(0, 0.15^2), every other tensor
N(0, 0.15^2). Variants: `postnorm` = group-norm extractor, no conv bias, post-LN transformer
(Base layout); `prenorm` = layer-norm extractor, conv bias, pre-LN transformer (Large layout).

- `torchaudio_postnorm.pt`, `torchaudio_prenorm.pt`: `torch.save(HuBERTPretrainModel.state_dict())`
  (an OrderedDict carrying `_metadata`). The positional conv's weight norm is saved as
  `wav2vec2.encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0` (g,
  [1,1,16]) and `original1` (v, [64,16,16]).
- `fairseq_postnorm.pt`: the postnorm weights under fairseq HuBERT names, laid out like
  `hubert_base_ls960.pt`: `args` (an argparse.Namespace, inert), `cfg` (plain dict: model, task,
  common, ...), `model` (OrderedDict, fairseq names, legacy `encoder.pos_conv.0.weight_g` /
  `weight_v`), `optimizer_history`, `extra_state` (holds a numpy.float64), `task_state`
  (`dictionaries`: one object pickled as `fairseq.data.dictionary.Dictionary`, with `symbols` =
  the 4 specials `<s> <pad> </s> <unk>` + cluster ids `0`..`15`: 20 entries, the row count of
  `label_embs_concat`, as fairseq sizes it), `last_optimizer_state` (None).
- `s3prl_postnorm.pt`: the same weights as s3prl's converted upstream
  (`s3prl/upstream/hubert/convert.py`): `task_cfg`, `model_cfg`, `model_weight`,
  `dictionaries_symbols`.
- `malicious_root.pt` (the root object) and `malicious_extra.pt` (a small fairseq-looking dict,
  the payload under `extra_state`): unpickling either runs
  `os.system("{cmd}")` (pickle GLOBAL `posix system`).
  **Never open these with `torch.load` / `pickle.load`**: an importer must refuse them without
  executing anything (and `/tmp/fedhubert-pickle-was-executed` must not appear).
- `reference.safetensors`: `input_values` [2, 16000]; for V in postnorm, prenorm:
  `V.extract_features` [2, 49, 32], `V.hidden_states.0..2` and `V.last_hidden_state` [2, 49, 64]
  (transformers `HubertModel`, eval, `output_hidden_states=True`, on these weights),
  `V.torchaudio_layer.0..1` (torchaudio `Wav2Vec2Model.extract_features`). They agree to 1e-5:
  torchaudio layer i == hidden_states.(i+1) in both variants. In prenorm, `last_hidden_state` is
  the final encoder LayerNorm of `hidden_states.2` (transformers 5.x keeps the raw last-layer
  output in hidden_states[-1]), so there hidden_states.2 != last_hidden_state; in postnorm they
  are equal.
- `hf_config_postnorm.json`, `hf_config_prenorm.json`: the `HubertConfig.to_json_string()` used.

Every `.pt` is torch's zip format; the records sit under a folder named after the file's stem
(`torchaudio_postnorm/data.pkl`, `torchaudio_postnorm/data/0`, ...), not under `archive/`.
"""


def main():
    ensure_venv(PACKAGES, PROBE)
    import numpy as np
    import safetensors
    import torch
    import torchaudio
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                "transformers": transformers.__version__, "numpy": np.__version__,
                "safetensors": safetensors.__version__}
    print("versions:", versions)

    x = make_input()
    reference = {"input_values": x}
    all_diffs = {}
    fs_sd = None
    for variant in VARIANTS:
        model = build_torchaudio(variant)
        sd = model.state_dict()
        assert all(v.dtype == torch.float32 for v in sd.values())
        torch.save(sd, OUT / f"torchaudio_{variant}.pt")
        config, tensors, diffs = run_variant(variant, model, x)
        reference.update(tensors)
        all_diffs[variant] = diffs
        (OUT / f"hf_config_{variant}.json").write_text(config.to_json_string())
        if variant == "postnorm":
            fs_sd = to_fairseq_state_dict(sd, variant)
            torch.save(fairseq_checkpoint(fs_sd), OUT / "fairseq_postnorm.pt")
            torch.save(s3prl_checkpoint(fs_sd), OUT / "s3prl_postnorm.pt")
        else:
            to_fairseq_state_dict(sd, variant)  # the layer_norm-mode mapping is checked too

    reference = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in reference.items()}
    # ONE metadata entry: safetensors keeps metadata in a hash map, so with several entries the
    # header's key order (and the file's bytes) would change from run to run.
    save_file(reference, OUT / "reference.safetensors",
              metadata={"versions": json.dumps(versions, sort_keys=True)})

    torch.save(RunsShellOnUnpickle(), OUT / "malicious_root.pt")
    torch.save(malicious_extra(fs_sd), OUT / "malicious_extra.pt")
    (OUT / "README.md").write_text(README.format(cmd=PICKLE_CMD, **versions))

    # ---- report (nothing below unpickles anything) ----
    for variant, diffs in all_diffs.items():
        print(f"\n[{variant}] torchaudio vs transformers, max abs diff:")
        for name, d in diffs.items():
            print(f"  {name}: {d:.3e}")
    print("\nreference.safetensors:")
    for k, v in reference.items():
        print(f"  {k} {tuple(v.shape)} std {v.std().item():.4f}")
    print("\npickle GLOBALs per file (archive prefix in the zip):")
    for f in sorted(OUT.glob("*.pt")):
        prefix, globs, data = pickle_globals(f)
        print(f"  {f.name} [{prefix}/]: {', '.join(globs)}")
        if f.name.startswith("malicious"):
            assert "posix system" in globs, globs
            text = io.StringIO()
            pickletools.dis(data, out=text)
            lines = [ln for ln in text.getvalue().splitlines() if "GLOBAL" in ln and "system" in ln]
            print("    " + "\n    ".join(lines))
    print(f"\n{PICKLE_CMD.split()[-1]} exists: {os.path.exists(PICKLE_CMD.split()[-1])}")
    print("\nfiles:")
    total = 0
    for f in sorted(OUT.iterdir()):
        b = f.read_bytes()
        total += len(b)
        print(f"  {f.name:28s} {len(b):8d} B  sha256 {hashlib.sha256(b).hexdigest()}")
    print(f"  total {total} B")


if __name__ == "__main__":
    main()
