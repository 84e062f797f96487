"""`flexmoe eval`: perplexity per domain, optionally with experts opted out and the soup baseline."""

from __future__ import annotations

import argparse
import json
import sys

from flexmoe.commands.common import add_selection_arguments, add_verify_argument, name_eq_value, verify_inputs
from flexmoe.commands.inputs import check_data_for_model, finite_or_none, require_positive


def main(argv: list[str]) -> int:
    """`flexmoe eval`: perplexity per domain, optionally with experts opted out and the soup baseline."""
    from flexmoe.train.load import load_model
    from flexmoe.data import TokenWindows
    from flexmoe.eval.baselines import soup_model
    from flexmoe.train.perplexity import model_logprobs, perplexity
    from flexmoe.flex.consent import active_mask

    p = argparse.ArgumentParser(prog="flexmoe eval", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--data", action="append", required=True, metavar="DOMAIN=DIR")
    p.add_argument("--soup", action="store_true", help="also evaluate the model soup of the experts")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-windows", type=int, default=64)
    p.add_argument("--route-embedder", metavar="PATH",
                   help="document routing by this local sentence-transformers model (anchor_* merges; "
                        "needs --domain-embedding for every expert)")
    p.add_argument("--domain-embedding", action="append", default=[], metavar="NAME=FILE",
                   help="an expert's (or public's) router-embed --embedder output, for --route-embedder")
    p.add_argument("--route-chunk", type=int, default=32, help="tokens per routing decision of --route-embedder")
    add_selection_arguments(p)
    add_verify_argument(p)
    a = p.parse_args(argv)
    require_positive(p, a, "--seq-len", "--num-windows", "--route-chunk")
    model, cfg, meta = load_model(a.model, verify=verify_inputs(a, "eval", a.model))
    model.eval()
    data = {}
    for item in a.data:
        d, path = name_eq_value(item, "--data", p)
        if not d or d in data:
            p.error(f"--data {item!r}: {'a domain name is empty' if not d else f'domain {d!r} given twice'}")
        data[d] = TokenWindows(path, a.seq_len)
        check_data_for_model(data[d], cfg, meta, a.model, f"--data {d}", seq_len=a.seq_len)
    router = None
    if a.route_embedder:
        from flexmoe.data import load_tokenizer
        from flexmoe.flex.docembed import EmbedderRouter, load_embedder, read_domain_embeddings

        if not cfg.is_moe or cfg.routing == "topk":
            raise ValueError(f"--route-embedder needs a merge with an anchor_* routing; {a.model} routes "
                             f"{'dense' if not cfg.is_moe else repr(cfg.routing)} (merge with --routing anchor_top1)")
        files = dict(name_eq_value(x, "--domain-embedding", p) for x in a.domain_embedding)
        embs = read_domain_embeddings(meta.get("experts") or [], files)
        # the embedder reads text: decode with the tokenizer that made the eval data
        tok = load_tokenizer(next(iter(data.values())).manifest["tokenizer"])
        router = EmbedderRouter(load_embedder(a.route_embedder), embs, tok.decode, chunk=a.route_chunk)
    opt_out = [o for o in a.opt_out.split(",") if o]
    if not cfg.is_moe and (opt_out or a.use):
        p.error(f"{a.model} is a dense model: it has no experts for --opt-out or --use to select")
    # opted-out experts and, with --use, experts whose consent does not cover it are off, in the
    # model and in the soup alike
    mask = active_mask(meta.get("experts") or [], use=a.use, opt_out=opt_out, today=a.date) if cfg.is_moe else None
    rows = {"model": {d: perplexity(model_logprobs(model, mask, router), w, a.num_windows, label=f"eval {d}")
                      for d, w in data.items()}}
    if a.soup and cfg.is_moe:
        s = soup_model(model, mask)
        rows["soup"] = {d: perplexity(model_logprobs(s), w, a.num_windows, label=f"eval soup {d}") for d, w in data.items()}
    # nan/inf (a model whose outputs overflow) is not JSON: reported as null, and said on stderr
    bad = [f"{row}/{d}={v}" for row, r in rows.items() for d, v in r.items() if finite_or_none(v) is None]
    rows = {row: {d: finite_or_none(v) for d, v in r.items()} for row, r in rows.items()}
    print(json.dumps({"perplexity": rows}, indent=1, allow_nan=False))
    if bad:
        print(f"flexmoe eval: error: {a.model}: perplexity not finite ({', '.join(bad)}; reported as null): the "
              "model's outputs overflow; check its weights", file=sys.stderr)
        return 2
    return 0
