"""The public model's identity: sha256 over its shared tensors and its FFN (the anchor)."""

from __future__ import annotations

import hashlib

import torch

from flexmoe.config.model import NATIVE_BUFFERS
from flexmoe.io.keys import dense_ffn_key, is_router_key, parse_experts_key


def anchor_view(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors every model branched from one public model shares, named as in the dense model.

    Routers and non-anchor experts are left out; expert slot 0 is the public FFN.
    """
    out = {}
    for k, v in sd.items():
        if is_router_key(k) or k in NATIVE_BUFFERS:  # routing state, per expert
            continue
        parsed = parse_experts_key(k)
        if parsed:
            out[dense_ffn_key(*parsed)] = v[0]
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
