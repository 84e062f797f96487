"""Builders for the privacy and governance tests: byte-level tiny models, real stdlib text, an
overtrained expert. (A uniquely named module: `conftest`/`helpers` names clash across folders.)"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flexmoe.config import ModelConfig
from flexmoe.io.model_dir import save_model_dir
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.io.fingerprint import fingerprint
from flexmoe.train.freeze import PLANS, apply_freeze_plan
from flexmoe.flex.router_init import attach_public_embedding
from flexmoe.model import Transformer

BYTE_TINY = ModelConfig(vocab_size=258, d_model=64, num_layers=2, num_heads=4, d_ff=256, max_seq_len=256,
                        eos_token_id=256, pad_token_id=257)


def make_byte_public(root: Path, cfg: ModelConfig = BYTE_TINY, seed: int = 0, *, head_scale: float = 10.0,
                     embed_scale: float = 25.0) -> Path:
    """A random byte-level public model with trained-model scales where they matter.

    At init_std 0.02 a frozen LM head has rows of norm ~0.16, which caps every logit gap near 1:
    no expert behind it could ever be confident, and nothing could be memorised. A trained head
    and embeddings are an order of magnitude larger; scaling them stands in for pretraining."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.reset_parameters(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
        model.embed.weight.mul_(embed_scale)
    sd = model.state_dict()
    out = save_model_dir(root / "public", cfg, sd, {"kind": "public", "fingerprint": fingerprint(sd),
                                                    "tokenizer": ByteTokenizer().spec()})
    rows = torch.randn(cfg.num_layers, cfg.d_model, generator=torch.Generator().manual_seed(seed + 99))
    save_file({"router_embedding": rows}, str(root / "public_rows.safetensors"))
    attach_public_embedding(out, root / "public_rows.safetensors")
    return out


def stdlib_text(num_bytes: int) -> str:
    """Real text: the source of a few standard-library modules, first `num_bytes` bytes."""
    import argparse
    import textwrap

    text = inspect.getsource(textwrap) + inspect.getsource(argparse)
    return text.encode("utf-8")[:num_bytes].decode("utf-8", "ignore")


def prepared_text(root: Path, name: str, text: str) -> Path:
    """`text` as one document, byte-tokenised by prepare-data; returns the directory."""
    src = root / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    return _prepare(src, root / name, name)


def _prepare(src: Path, out: Path, name: str) -> Path:
    prepare_data([src], out, ByteTokenizer(), domain=name, progress=False)
    return out


def prepared_docs(root: Path, name: str, docs: list[str]) -> Path:
    """Documents as jsonl, prepared with the byte tokenizer (each followed by end-of-text)."""
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return _prepare(src, root / name, name)


def docstring_docs(num_docs: int, num_bytes: int = 80) -> list[str]:
    """Distinct first paragraphs of standard-library docstrings, cut to `num_bytes` (ASCII only,
    so bytes and characters agree)."""
    import argparse
    import collections
    import difflib
    import json as json_mod
    import pathlib
    import random
    import shutil
    import tarfile
    import textwrap
    import zipfile

    seen: dict[str, None] = {}
    for mod in (textwrap, argparse, pathlib, random, collections, difflib, json_mod, shutil, tarfile, zipfile):
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or not doc.isascii():
                continue
            first = doc.split("\n\n")[0][:num_bytes]
            if len(first) >= min(num_bytes, 72):
                seen.setdefault(first)
    docs = list(seen)
    assert len(docs) >= num_docs, f"only {len(docs)} docstrings found"
    return docs[:num_docs]


def overtrain_expert(model: Transformer, docs: list[str], *, steps: int, seq_len: int = 64, batch_size: int = 32,
                     lr: float = 3e-2, seed: int = 0) -> Transformer:
    """Train the expert of a branched model (expert_anchor) on random windows of the documents,
    many epochs over: the deliberately memorising owner the audit must catch."""
    apply_freeze_plan(model, PLANS["expert_anchor"])
    tok = ByteTokenizer()
    stream = torch.from_numpy(np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs]).astype(np.int64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen).tolist()
        batch = torch.stack([stream[s:s + seq_len + 1] for s in starts])
        logits = model(batch[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def train_private(cfg, privacy):
    """A DP-SGD run of `cfg` (a RunConfig) with `privacy` (a PrivacyConfig): the ordinary trainer
    with privacy.enabled=true."""
    import dataclasses

    from flexmoe.train.trainer import train

    return train(dataclasses.replace(cfg, privacy=dataclasses.replace(privacy, enabled=True)))
