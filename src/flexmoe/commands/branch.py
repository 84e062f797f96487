"""`flexmoe branch`: dense public model -> the owner's 2-expert anchor model."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe branch`: dense public model -> the owner's 2-expert anchor model."""
    from flexmoe.commands.common import add_writer_arguments, inputs_hashed_aside, writer_options
    from flexmoe.io.files import check_disjoint, check_output_dir

    p = argparse.ArgumentParser(prog="flexmoe branch", description=main.__doc__)
    p.add_argument("public")
    p.add_argument("out")
    p.add_argument("--router-embedding", help="the owner's rows from `flexmoe router-embed`")
    p.add_argument("--router-bias", action="store_true", help="add FlexOlmo's non-positive per-expert bias")
    add_writer_arguments(p)
    a = p.parse_args(argv)
    opts = writer_options(a)
    check_disjoint(a.out, [a.public, a.router_embedding], "OUT")
    check_output_dir(a.out, flag=None)
    with inputs_hashed_aside([a.public]):  # torch is imported below, while children hash the public model
        return _branch(a, opts)


def _branch(a: argparse.Namespace, opts: dict) -> int:
    from flexmoe.flex.branch import branch
    from flexmoe.flex.router_init import read_profile_dp

    given = read_router_rows(a.router_embedding, a.public) if a.router_embedding else {}
    profile_dp = read_profile_dp(a.router_embedding) if a.router_embedding else None
    print(branch(a.public, a.out, given.get("router_embedding"), router_bias=a.router_bias,
                 owner_ngram=given.get("domain_ngram"), owner_profile_dp=profile_dp, **opts))
    return 0


def read_router_rows(path: str, public: str) -> dict:
    """The tensors of a `flexmoe router-embed` file, checked against the public model's shape:
    `router_embedding` [num_layers, d_model] and an optional 1-D `domain_ngram`, finite floats."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from flexmoe.config.model import ModelConfig

    flag = f"--router-embedding {path}"
    if not Path(path).is_file():
        raise ValueError(f"{flag}: no such file; give the output of `flexmoe router-embed`")
    try:
        rows = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{flag}: not a readable safetensors file ({e}); re-run `flexmoe router-embed`") from e
    cfg = ModelConfig.load(Path(public) / "config.json")
    want = {"router_embedding": (cfg.num_layers, cfg.d_model)}
    if "router_embedding" not in rows:
        raise ValueError(f"{flag}: holds no 'router_embedding' tensor (has {sorted(rows)}); re-run `flexmoe router-embed`")
    for name, t in rows.items():
        if name not in ("router_embedding", "domain_ngram", "domain_embedding"):
            continue
        shape_ok = tuple(t.shape) == want[name] if name in want else t.ndim == 1 and t.numel() > 0
        if not shape_ok or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{flag}: tensor {name!r} is {t.dtype} {tuple(t.shape)}"
                             f"{' with non-finite values' if shape_ok and t.is_floating_point() else ''}; "
                             f"expected finite floats{' of shape ' + str(want[name]) if name in want else ''} "
                             f"for {public} (re-run `flexmoe router-embed --model {public}`)")
    return rows
