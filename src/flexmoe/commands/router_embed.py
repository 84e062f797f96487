"""`flexmoe router-embed`: router rows for one owner's data (or, with --public, the public row)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe router-embed`: router rows for one owner's data (or, with --public, the public row)."""
    from flexmoe.flex.router_init import attach_public_embedding, compute_router_embedding
    from flexmoe.data.ngrams import DEFAULT_BUCKETS

    p = argparse.ArgumentParser(prog="flexmoe router-embed", description=main.__doc__)
    p.add_argument("--model", required=True, help="the public model directory")
    p.add_argument("--data", required=True, help="a prepared data directory (the owner's own)")
    p.add_argument("--out", help="output safetensors file (default: inside the model dir with --public)")
    p.add_argument("--public", action="store_true", help="attach the result to the public model as its router row")
    p.add_argument("--embedder", help="local sentence-transformers model directory (default: hidden states)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-windows", type=int, default=128)
    p.add_argument("--ngram-buckets", type=int, default=DEFAULT_BUCKETS,
                   help="hash buckets of the data's n-gram profile for routing=anchor_ngram (0: none)")
    a = p.parse_args(argv)
    if a.ngram_buckets < 0:
        p.error(f"--ngram-buckets={a.ngram_buckets} must be >= 0")
    out = a.out or str(Path(a.model) / ".router_public.tmp.safetensors")
    rows = compute_router_embedding(a.model, a.data, out, seq_len=a.seq_len, num_windows=a.num_windows,
                                    embedder=a.embedder, ngram_buckets=a.ngram_buckets)
    if a.public:
        attach_public_embedding(a.model, out)
        if not a.out:
            Path(out).unlink()
    print(f"router embedding {tuple(rows.shape)} -> {a.model if a.public else out}")
    return 0
