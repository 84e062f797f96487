"""Merging baselines to beat: a model soup (experts' FFNs averaged into one dense model) and a
BTM-style ensemble (each owner's own 2-expert model, output distributions averaged)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexmoe.config.model import NATIVE_BUFFERS
from flexmoe.model import Transformer
from flexmoe.io.keys import dense_ffn_key, is_router_key, parse_experts_key


def soup_model(merged: Transformer, mask: torch.Tensor | None = None) -> Transformer:
    """Dense model whose FFN is the mean of the expert FFNs of `merged` (shared tensors kept).

    `mask` (bool `[E]`, as opt-out and consent give it): only the experts it keeps are averaged, so
    the soup baseline of a request never contains an expert the request switched off."""
    cfg = merged.cfg.replace(num_experts=0, router_bias=False)
    sd = {}
    for k, v in merged.state_dict().items():
        if is_router_key(k) or k in NATIVE_BUFFERS:
            continue
        parsed = parse_experts_key(k)
        if parsed:
            sd[dense_ffn_key(*parsed)] = (v if mask is None else v[mask]).float().mean(0)
        else:
            sd[k] = v
    model = Transformer(cfg)
    model.load_state_dict(sd)
    return model.eval()


def ensemble_logprobs(models: list[Transformer]):
    """Uniform mixture of the models' next-token distributions (BTM's simplest ensemble)."""
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        lps = torch.stack([F.log_softmax(m(tokens).logits.float(), dim=-1) for m in models])
        return torch.logsumexp(lps, dim=0) - math.log(len(models))
    return fn
