"""Sampling continuations from any flexmoe model: greedy, or temperature with top-k / top-p.

No KV cache: every new token recomputes the full forward over the sequence so far. At the sizes
audited on CPU this costs little, and it keeps generation exactly the model's own forward (any
routing policy, any expert mask) with no second code path to keep in step with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """How to pick each next token. `greedy` ignores the rest; `top_k=0` and `top_p=1` are off."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # continuations per prompt (greedy: always 1, they would be equal)

    def validate(self) -> None:
        """Refuse settings that cannot sample, naming the setting."""
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (or use greedy decoding)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: off)")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")

    def label(self) -> str:
        """Short name for reports, e.g. `greedy` or `T=0.7,k=40,p=0.95,n=4`."""
        if self.greedy:
            return "greedy"
        return f"T={self.temperature:g},k={self.top_k},p={self.top_p:g},n={self.num_samples}"


def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs = sorted_BV.softmax(-1)
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order_BV, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


@torch.no_grad()
def generate(model, prompts_BP: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None, *,
             expert_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             batch_size: int = 64) -> torch.Tensor:
    """Continuations `[B * n, max_new_tokens]` of equal-length prompts `[B, P]`; rows b*n .. b*n+n-1
    belong to prompt b (n = sampling.num_samples, 1 when greedy).

    Batches of `batch_size` sequences; the context is cut to the model's `max_seq_len` from the
    left. Sampling draws from `generator` (CPU), so a seeded generator repeats the same outputs.
    """
    sampling = sampling or Sampling(greedy=True)
    sampling.validate()
    if prompts_BP.dim() != 2 or prompts_BP.shape[1] == 0:
        raise ValueError(f"prompts must be [batch, length>0] token ids, got shape {tuple(prompts_BP.shape)}")
    n = 1 if sampling.greedy else sampling.num_samples
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seqs = prompts_BP.to(device).repeat_interleave(n, dim=0)
    max_len = model.cfg.max_seq_len
    outs = []
    try:
        for start in range(0, seqs.shape[0], batch_size):
            x = seqs[start:start + batch_size]
            for _ in range(max_new_tokens):
                logits = model(x[:, -max_len:], expert_mask).logits[:, -1].float()
                if sampling.greedy:
                    nxt = logits.argmax(-1)
                else:
                    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
                    nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).squeeze(1).to(device)
                x = torch.cat([x, nxt[:, None]], dim=1)
            outs.append(x[:, prompts_BP.shape[1]:])
    finally:
        model.train(was_training)
    return torch.cat(outs).cpu()
