"""Perplexity per eval domain for any model (or ensemble) on prepared validation data."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

LogProbFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, S] -> log-probs [B, S, V]


def model_logprobs(model, expert_mask: torch.Tensor | None = None, router=None) -> LogProbFn:
    """Log-probs of `model`; `router` (e.g. flex.docembed.EmbedderRouter) picks the domain expert
    per position from outside the model (`route_choice`)."""
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        choice = router.choice(tokens, expert_mask) if router is not None else None
        return F.log_softmax(model(tokens, expert_mask, route_choice=choice).logits.float(), dim=-1)
    return fn


@torch.no_grad()
def perplexity(logprob_fn: LogProbFn, windows, num_windows: int = 64, batch_size: int = 8, label: str | None = None) -> float:
    """exp(mean next-token NLL) over the first `num_windows` windows of a TokenWindows set.

    `label`: show progress (windows done, rate, ETA) under this name on stderr."""
    from flexmoe.io.progress import Progress

    n = min(len(windows), num_windows)
    progress = Progress(label, n, unit="windows") if label else None
    nll, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(np.stack([windows[i] for i in range(start, min(start + batch_size, n))]))
        lp = logprob_fn(batch[:, :-1])
        nll -= lp.gather(-1, batch[:, 1:, None]).sum().item()
        count += batch[:, 1:].numel()
        if progress is not None:
            progress.advance(len(batch))
    if progress is not None:
        progress.finish(None)
    return math.exp(nll / max(count, 1))
