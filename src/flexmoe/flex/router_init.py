"""Router embeddings: one router row per MoE layer for an expert, computed from its owner's data alone.

Default: the mean over the owner's tokens of the public model's hidden state at each FFN input
(the router's own input space). Option: a sentence-transformers embedder given by local path,
mean document embedding projected to d_model by a fixed, seeded random matrix. Beside the rows,
the data's n-gram profile (model/docroute.py) for document routing (`routing=anchor_ngram`).
With `profile_dp` the profile is differentially private (data/private_ngrams.py) and the rows are
zero: a mean of the owner's data without noise would void the profile's guarantee.
"""

from __future__ import annotations

from pathlib import Path

import json
from typing import Any

import numpy as np
import torch

from flexmoe.io.model_dir import CheckpointError, read_json, write_json
from flexmoe.train.load import load_model
from flexmoe.io.files import atomic_write_bytes, sha256_file
from flexmoe.io.progress import Progress
from flexmoe.data.ngrams import DEFAULT_BUCKETS, ngram_profile


@torch.no_grad()
def spread_indices(num_total: int, num_wanted: int) -> np.ndarray:
    """Evenly spaced window indices over the whole set: the first N windows of a token stream are
    a handful of documents, not a sample of the domain (seen: a legal centroid from 2 licences)."""
    n = min(num_total, num_wanted)
    return np.unique(np.linspace(0, num_total - 1, n).round().astype(np.int64))


def sample_texts(windows, num_windows: int = 128) -> list[str]:
    """The text of `num_windows` windows spread over a TokenWindows set (what an embedder sees)."""
    from flexmoe.data import load_tokenizer

    tok = load_tokenizer(windows.manifest["tokenizer"])
    return [tok.decode(windows[int(i)].tolist()) for i in spread_indices(len(windows), num_windows)]


def hidden_state_embedding(model, windows, num_windows: int = 128, batch_size: int = 8) -> torch.Tensor:
    """Mean FFN-input hidden state per layer over `num_windows` windows spread over the set -> `[L, D]`."""
    model.eval()
    idx = spread_indices(len(windows), num_windows)
    if len(idx) == 0:
        raise ValueError("router embedding needs at least one window of data")
    sums, count = None, 0
    progress = Progress("router-embed: hidden states", len(idx), unit="windows")
    for start in range(0, len(idx), batch_size):
        batch = torch.from_numpy(np.stack([windows[int(i)] for i in idx[start:start + batch_size]]))
        hs = model(batch[:, :-1], capture_hidden=True, last_hidden_only=True).hidden_states
        layer_sums = torch.stack([h.float().sum(dim=(0, 1)) for h in hs])
        sums = layer_sums if sums is None else sums + layer_sums
        count += batch[:, :-1].numel()
        progress.advance(len(batch))
    progress.finish(None)
    return sums / count


def embedder_embedding(embedder_path: str | Path, texts: list[str], d_model: int, num_layers: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router rows from a sentence-transformers embedder: the owner's domain embedding (unit-norm
    mean of its texts' embeddings, `[H]`, also the key of document routing by embedder) projected
    to d_model with a seeded Gaussian matrix (the same seed for every owner, so rows stay
    comparable) -> (`[L, D]` rows, `[H]` domain embedding)."""
    from flexmoe.flex.docembed import domain_embedding, load_embedder

    emb = domain_embedding(load_embedder(embedder_path), texts)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(emb.shape[0], d_model, generator=gen) / emb.shape[0] ** 0.5
    return (emb @ proj).expand(num_layers, d_model).clone(), emb


def compute_router_embedding(model_dir: str | Path, data_dir: str | Path, out_file: str | Path, *,
                             seq_len: int = 256, num_windows: int = 128, embedder: str | None = None,
                             seed: int = 0, ngram_buckets: int = DEFAULT_BUCKETS,
                             profile_dp: dict[str, Any] | None = None) -> torch.Tensor:
    """Write `{"router_embedding": [L, D]}` safetensors for the data in `data_dir` under `model_dir`,
    with `"domain_ngram": [ngram_buckets]`, the data's n-gram profile for document routing, unless
    `ngram_buckets` is 0.

    `profile_dp`: keyword arguments of `private_ngram_profile` (epsilon, delta, mechanism, unit,
    window, cap_bucket, cap_total, noise_seed): the profile is DP, its budget record goes into the
    file's metadata (`profile_dp`, JSON), and the rows are zero (not computed from the data)."""
    from safetensors.torch import save

    from flexmoe.data import TokenWindows

    if profile_dp is not None and (embedder or ngram_buckets <= 0):
        raise ValueError("--dp-epsilon makes the n-gram profile private; it needs --ngram-buckets > 0 and no "
                         "--embedder (an embedder's domain embedding is a mean of the data without noise)")
    model, cfg, meta = load_model(model_dir)
    windows = TokenWindows(data_dir, seq_len)
    record = None
    if profile_dp is not None:
        from flexmoe.data.private_ngrams import private_ngram_profile

        profile, record = private_ngram_profile(data_dir, buckets=ngram_buckets, **profile_dp)
        rows = torch.zeros(cfg.num_layers, cfg.d_model)
    elif embedder:
        rows, domain_emb = embedder_embedding(embedder, sample_texts(windows, num_windows), cfg.d_model, cfg.num_layers, seed)
    else:
        rows = hidden_state_embedding(model, windows, num_windows)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"router_embedding": rows.contiguous()}
    if embedder:
        tensors["domain_embedding"] = domain_emb.contiguous()
    if ngram_buckets > 0:
        tensors["domain_ngram"] = (profile if record else ngram_profile(data_dir, ngram_buckets)).contiguous()
    metadata = {"method": "embedder" if embedder else "zero" if record else "hidden_state", "data": str(data_dir)}
    if record:
        metadata["profile_dp"] = json.dumps(record, sort_keys=True)
    atomic_write_bytes(out_file, save(tensors, metadata=metadata))
    return rows


def read_profile_dp(rows_file: str | Path) -> dict[str, Any] | None:
    """The DP budget record of a `router-embed --dp-epsilon` file's n-gram profile (None: exact
    profile), checked against its schema."""
    from safetensors import safe_open

    from flexmoe.io.schema import PROFILE_DP, check

    with safe_open(str(rows_file), "pt") as f:
        raw = (f.metadata() or {}).get("profile_dp")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{rows_file}: metadata 'profile_dp' is not JSON ({e}); re-run `flexmoe router-embed`") from e
    return check(record, PROFILE_DP, f"{rows_file} (metadata profile_dp)")


def attach_public_embedding(public_dir: str | Path, rows_file: str | Path) -> None:
    """Ship the public router row with the public model (copied in, listed in flexmoe.json)."""
    public_dir = Path(public_dir)
    meta = read_json(public_dir / "flexmoe.json")
    if meta.get("kind") != "public":
        raise CheckpointError(f"{public_dir}: not a public (dense) model directory")
    name = "router_public.safetensors"
    atomic_write_bytes(public_dir / name, Path(rows_file).read_bytes())  # a few KB: one row per layer
    meta["router_embedding"] = {"router_public": name}
    meta.setdefault("files", {})[name] = sha256_file(public_dir / name)
    write_json(public_dir / "flexmoe.json", meta)
