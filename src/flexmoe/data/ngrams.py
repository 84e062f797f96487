"""Hashed token n-gram profiles of a data set: the statistic document routing compares windows to.

`ngram_buckets` hashes the n-grams ending at each position; an owner's profile is the smoothed
log-frequency of its data's buckets (`ngram_profile`, one streaming pass over a prepared data
directory). `flexmoe.model.docroute` scores windows against profiles at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

NGRAM_ORDERS = (1, 2, 3, 4)
DEFAULT_BUCKETS = 1 << 15
_MOD = 2_147_483_647  # a prime below 2^31: products with _MULT stay inside int64
_MULT = 1_000_003
_SALT = 104_729  # separates orders that would otherwise share hashes (e.g. a 1-gram and a 2-gram)
SMOOTHING = 0.5  # additive count per bucket: an n-gram the owner never saw is unlikely, not impossible


def ngram_buckets(tokens_BS: torch.Tensor, buckets: int, orders: Iterable[int] = NGRAM_ORDERS) -> torch.Tensor:
    """Hash bucket of the n-gram ending at each position, per order -> `[B, S, len(orders)]` int64;
    -1 where the window is too short for that order (no left context is invented)."""
    tok = tokens_BS.long() % _MOD
    B, S = tok.shape
    orders = tuple(orders)
    out = torch.full((B, S, len(orders)), -1, dtype=torch.long, device=tok.device)
    h = torch.zeros_like(tok)
    for n in range(1, max(orders) + 1):
        # h_n(t) covers tokens t-n+1..t: extend h_{n-1}(t-1) by token t.
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        h = (prev * _MULT + tok) % _MOD
        if n in orders:
            k = orders.index(n)
            b = ((h + n * _SALT) % _MOD) % buckets
            out[:, n - 1:, k] = b[:, n - 1:]
    return out


def ngram_counts(token_chunks: Iterable[np.ndarray | tuple[np.ndarray, int]],
                 buckets: int = DEFAULT_BUCKETS) -> torch.Tensor:
    """Bucket counts over token arrays (each a contiguous run, e.g. a shard) -> `[buckets]` float64.
    A chunk may be `(tokens, skip)`: its first `skip` tokens are left context only (n-grams ending
    there were counted with the previous chunk)."""
    counts = torch.zeros(buckets, dtype=torch.float64)
    for chunk in token_chunks:
        tokens, skip = chunk if isinstance(chunk, tuple) else (chunk, 0)
        t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        ids = ngram_buckets(t, buckets)[0, skip:].flatten()
        counts += torch.bincount(ids[ids >= 0], minlength=buckets).double()
    return counts


def profile_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Smoothed log-frequency per bucket -> `[buckets]` float32."""
    c = counts.double() + SMOOTHING
    return (c.log() - c.sum().log()).float()


def ngram_profile(data_dir: str | Path, buckets: int = DEFAULT_BUCKETS, max_tokens: int = 50_000_000,
                  chunk: int = 1 << 20) -> torch.Tensor:
    """The profile of a prepared data directory (`flexmoe prepare-data` output): every shard's
    tokens up to `max_tokens`, read in chunks so memory stays flat."""
    from flexmoe.data.dataset import TokenWindows

    stream = TokenWindows(data_dir, 1)  # every shard of the directory as one memory-mapped stream
    n = min(stream.num_tokens, max_tokens)
    # Each chunk starts with the previous one's last tokens as left context, so the n-grams that
    # cross a boundary are counted once, exactly as in one pass over the whole stream.
    over = max(NGRAM_ORDERS) - 1
    pieces = ((stream.tokens(max(0, a - over), min(n, a + chunk)), a - max(0, a - over)) for a in range(0, n, chunk))
    return profile_from_counts(ngram_counts(pieces, buckets))
