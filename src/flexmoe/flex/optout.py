"""Opt-out at inference: switch experts off by owner or domain name, without touching weights.

The mask sets router logits to -inf before the softmax, so the remaining experts' weights are
exactly those of a model merged without the switched-off experts (see model/moe.py).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def expert_mask(experts: list[dict[str, Any]], off: Iterable[str] = ()) -> torch.Tensor | None:
    """Bool `[E]` mask (False = off) from the merged model's expert list; None when nothing is off."""
    off = [o for o in off if o]
    if not off:
        return None
    names = {e["owner"] for e in experts} | {e["domain"] for e in experts}
    unknown = [o for o in off if o not in names]
    if unknown:
        raise ValueError(f"opt_out: unknown expert(s) {unknown}; this model has {sorted(names)}")
    mask = torch.tensor([e["owner"] not in off and e["domain"] not in off for e in experts])
    if not bool(mask.any()):
        raise ValueError("opt_out switches off every expert; at least one must stay on")
    return mask
