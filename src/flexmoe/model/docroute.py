"""Document routing by n-gram profile: which owner's domain does the text so far look like?

Each owner summarises its own data as a *profile*: smoothed log-frequencies of hashed token
n-grams (orders 1-4, `buckets` hash buckets). The public row's profile comes from public data the
same way. At inference, position t of a window is scored against every profile by the summed
log-probability of the n-grams ending at positions <= t (a naive Bayes classifier over the
window so far, causal), and `routing=anchor_ngram` sends the position to the anchor plus the
winning domain expert (the anchor alone when the public profile wins).

Why n-grams and not the model's layer-0 hidden states (`anchor_doc`): on the quickstart, the
running mean of layer-0 states told licence text from the pydoc prose on under half of the legal
tokens, while token n-grams separate such registers from a few dozen tokens (measured in
tests/flex and the routing ablation). A profile needs nothing from other owners, costs one pass
over the owner's tokens and no model, and masking a profile (opt-out) leaves the others' scores
unchanged, so opt-out stays exact.

A profile is an aggregate statistic of the owner's data (like the router embedding): a DP owner
leaves it out, makes it DP (`router-embed --dp-epsilon`, data/private_ngrams.py), or accepts that
it is not covered by the DP guarantee (see train/privacy.py).
"""

from __future__ import annotations

import torch

from flexmoe.data.ngrams import ngram_buckets


def document_scores(tokens_BS: torch.Tensor, profiles_EB: torch.Tensor) -> torch.Tensor:
    """Per position, each profile's log-likelihood of the window's n-grams up to it -> `[B, S, E]`."""
    E, buckets = profiles_EB.shape
    ids_BSK = ngram_buckets(tokens_BS, buckets)
    valid = ids_BSK >= 0
    lp_BSKE = profiles_EB.float().T[ids_BSK.clamp(min=0)]  # [B, S, K, E]
    lp_BSE = (lp_BSKE * valid[..., None]).sum(2)
    # Accumulated in fp64, as CPU's fp32 cumsum does anyway (bit-identical there): the Hugging Face
    # release keeps the same fp64 running sum token by token while decoding, and on CUDA an fp32
    # scan would otherwise round differently from it.
    return lp_BSE.double().cumsum(1).float()


def ngram_choice(tokens_BS: torch.Tensor, profiles_EB: torch.Tensor,
                 expert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per position, the slot whose profile explains the window so far best (0: public) -> `[B, S]`.
    Masked slots never win; ties go to the lowest slot (the anchor)."""
    scores = document_scores(tokens_BS, profiles_EB.to(tokens_BS.device))
    if expert_mask is not None:
        scores = scores.masked_fill(~expert_mask.to(scores.device), float("-inf"))
    return scores.argmax(-1)
