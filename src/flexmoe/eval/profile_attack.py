"""What an n-gram profile gives away, and what it is worth for routing.

`membership_scores`: the attack on a released profile. Score each candidate document by the
mean, over its n-grams, of log P_owner(g) - log P_reference(g), where the reference profile comes
from similar text the attacker holds; the owner's own documents (members) tend to score higher,
because their n-grams were counted. `auc` is the attack's success: the chance that a random
member outscores a random non-member (0.5: no better than guessing).

`routing_accuracy`: the share of held-out windows of each domain whose document-routing choice
(model/docroute.py, the choice after the whole window) picks that domain's profile.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from flexmoe.data.ngrams import ngram_buckets
from flexmoe.model.docroute import ngram_choice


def membership_scores(docs: Sequence[np.ndarray], profile: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per document (1-D token array), its mean n-gram log-likelihood ratio owner / reference."""
    buckets = int(profile.shape[-1])
    ratio = (profile.double() - reference.double()).numpy()
    out = np.empty(len(docs))
    for i, doc in enumerate(docs):
        ids = ngram_buckets(torch.as_tensor(np.asarray(doc, dtype=np.int64))[None], buckets)[0].flatten().numpy()
        ids = ids[ids >= 0]
        out[i] = ratio[ids].mean() if len(ids) else 0.0
    return out


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC curve of members vs non-members (ties count one half)."""
    m, n = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("auc needs at least one member and one non-member")
    both = np.concatenate([m, n])
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # rank of each distinct value's first copy (1-based)
    ranks = (first + (counts - 1) / 2)[inverse]  # tied values share their mean rank
    return float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


@torch.no_grad()
def routing_accuracy(windows_by_domain: dict[str, np.ndarray], profiles: torch.Tensor,
                     slot_of: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per domain: `window` (share of its windows `[N, S]` whose choice after the last token is
    `slot_of[domain]`) and `token` (share of all positions routed there, each by its prefix)."""
    out = {}
    for domain, windows in windows_by_domain.items():
        choice = ngram_choice(torch.as_tensor(np.asarray(windows, dtype=np.int64)), profiles)
        right = choice == slot_of[domain]
        out[domain] = {"window": float(right[:, -1].double().mean()), "token": float(right.double().mean())}
    return out
