"""The public model's identity: sha256 over its shared tensors and its FFN (the anchor)."""

from __future__ import annotations

import hashlib
import re

import torch

from flexmoe.config.model import NATIVE_BUFFERS

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(gate_proj|up_proj|down_proj)$")
_DENSE = re.compile(r"^layers\.(\d+)\.ffn\.(gate_proj|up_proj|down_proj)\.weight$")


def anchor_view(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors every model branched from one public model shares, named as in the dense model.

    Routers and non-anchor experts are left out; expert slot 0 is the public FFN.
    """
    out = {}
    for k, v in sd.items():
        if ".ffn.router." in k or k in NATIVE_BUFFERS:  # routing state, per expert
            continue
        m = _EXPERT.match(k)
        if m:
            out[f"layers.{m.group(1)}.ffn.{m.group(2)}.weight"] = v[0]
        else:
            out[k] = v
    return out


def fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of the anchor view in sorted key order."""
    h = hashlib.sha256()
    for k, v in sorted(anchor_view(sd).items()):
        t = v.detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_shared_key(key: str) -> bool:
    """True for tensors outside the FFN experts and routers (attention, norms, embeddings, head)."""
    return ".ffn." not in key
