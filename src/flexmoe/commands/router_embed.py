"""`flexmoe router-embed`: router rows for one owner's data (or, with --public, the public row)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe router-embed`: router rows for one owner's data (or, with --public, the public row)."""
    from flexmoe.flex.router_init import attach_public_embedding, compute_router_embedding
    from flexmoe.commands.inputs import require_positive
    from flexmoe.data.ngrams import DEFAULT_BUCKETS
    from flexmoe.io.files import check_disjoint, check_output_file

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
    add_dp_arguments(p)
    a = p.parse_args(argv)
    if a.ngram_buckets < 0:
        p.error(f"--ngram-buckets={a.ngram_buckets} must be >= 0")
    require_positive(p, a, "--seq-len", "--num-windows")
    if a.out:
        # The output file must not replace or land inside what is read (the model's weights, a shard).
        check_disjoint(a.out, [a.model, a.data, a.embedder], "--out")
        check_output_file(a.out, "--out")
    check_inputs(a)
    out = a.out or str(Path(a.model) / ".router_public.tmp.safetensors")
    rows = compute_router_embedding(a.model, a.data, out, seq_len=a.seq_len, num_windows=a.num_windows,
                                    embedder=a.embedder, ngram_buckets=a.ngram_buckets, profile_dp=dp_settings(p, a))
    if a.public:
        attach_public_embedding(a.model, out)
        if not a.out:
            Path(out).unlink()
    print(f"router embedding {tuple(rows.shape)} -> {a.model if a.public else out}")
    if a.dp_epsilon is not None:
        from flexmoe.flex.router_init import read_profile_dp

        r = read_profile_dp(out)
        print(f"n-gram profile: ({r['epsilon']:g}, {r['delta']:g})-DP per {r['unit']} ({r['num_units']} units), "
              f"{r['mechanism']} noise of scale {r['noise_scale']:.4g}; router rows zero")
    return 0


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """--dp-*: a differentially private n-gram profile (data/private_ngrams.py)."""
    from flexmoe.data.private_ngrams import DEFAULT_CAP_BUCKET, DEFAULT_CAP_TOTAL, DEFAULT_WINDOW, MECHANISMS, UNITS

    p.add_argument("--dp-epsilon", type=float, help="make the n-gram profile (epsilon, delta)-DP; the router rows "
                   "are then zero (a noiseless mean of the data would void the guarantee)")
    p.add_argument("--dp-delta", type=float, default=0.0, help="delta of --dp-mechanism=gaussian (laplace: 0)")
    p.add_argument("--dp-mechanism", choices=MECHANISMS, default="laplace")
    p.add_argument("--dp-unit", choices=UNITS, default="auto",
                   help="the protected unit: a document (auto, when the data records document boundaries) or a window")
    p.add_argument("--dp-window", type=int, default=DEFAULT_WINDOW, help="tokens per unit with --dp-unit=window")
    p.add_argument("--dp-cap-bucket", type=float, default=DEFAULT_CAP_BUCKET,
                   help="most counts one unit adds to a bucket (default: --dp-cap-total; pays only for gaussian)")
    p.add_argument("--dp-cap-total", type=float, default=DEFAULT_CAP_TOTAL,
                   help="most counts one unit adds in all (the L1 sensitivity)")


def dp_settings(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict | None:
    """The keyword arguments of private_ngram_profile, or None without --dp-epsilon."""
    if a.dp_epsilon is None:
        return None
    if a.public:
        p.error("--dp-epsilon with --public: the public row comes from public data; drop --dp-epsilon")
    from flexmoe.data.private_ngrams import check_budget

    check_budget(a.dp_epsilon, a.dp_delta, a.dp_mechanism)
    for flag in ("--dp-window", "--dp-cap-bucket", "--dp-cap-total"):
        value = getattr(a, flag[2:].replace("-", "_"))
        if value is not None and not value > 0:
            p.error(f"{flag}={value} must be > 0")
    return {"epsilon": a.dp_epsilon, "delta": a.dp_delta, "mechanism": a.dp_mechanism, "unit": a.dp_unit,
            "window": a.dp_window, "cap_bucket": a.dp_cap_bucket, "cap_total": a.dp_cap_total}


def check_inputs(a: argparse.Namespace) -> None:
    """The owner's data must fit the public model (tokenizer, vocabulary, --seq-len), before any
    hidden state is computed."""
    from flexmoe.commands.inputs import check_data_for_model
    from flexmoe.config.model import ModelConfig
    from flexmoe.data import TokenWindows
    from flexmoe.io.model_dir import read_model_meta

    meta = read_model_meta(a.model)
    cfg = ModelConfig.load(Path(a.model) / "config.json")
    check_data_for_model(TokenWindows(a.data, a.seq_len), cfg, meta, a.model, "--data", seq_len=a.seq_len)
