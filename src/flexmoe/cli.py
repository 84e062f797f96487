"""The `flexmoe` command: one subcommand per lifecycle step.

    flexmoe prepare-data FILES... --out DIR [--tokenizer bytes|DIR] [--format lm|sft]
    flexmoe train [Hydra overrides: out_dir=... data.train.code.path=... stage=expert_anchor ...]
    flexmoe router-embed --model DIR --data DIR --out FILE [--public] [--embedder PATH]
    flexmoe branch PUBLIC OUT [--router-embedding FILE]
    flexmoe package TRAINED OUT --owner NAME --domain NAME [--licence L]
    flexmoe merge PUBLIC PACKAGE... --out DIR [--top-k K]
    flexmoe eval MODEL --data DOMAIN=DIR ... [--opt-out NAME,...] [--soup]
                 [--route-embedder PATH --domain-embedding NAME=FILE ...]
    flexmoe quickstart [recipe=flexolmo|bar] [out_dir=DIR] [key=value ...]
    flexmoe import-hf SRC DST            (Olmo2 / FlexOlmo Hugging Face directory -> native)
    flexmoe export-hf SRC DST            (native -> FlexOlmoForCausalLM / Olmo2ForCausalLM directory)
    flexmoe remove-expert SRC DST --expert NAME
    flexmoe generate MODEL --prompt TEXT [--attribution]  (with consent: --use commercial)
    flexmoe audit-extraction --data DIR --merged M --expert E --public P
    flexmoe consent MODEL                (the owners, their licences, uses and expiry)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config tree: $FLEXMOE_CONF, else the repository's conf/ beside src/."""
    env = os.environ.get("FLEXMOE_CONF")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


def load_config_of(model_dir: str):
    from flexmoe.config.model import ModelConfig

    return ModelConfig.load(Path(model_dir) / "config.json")


def _early_check(cfg) -> str | None:
    """Settings that can be refused from the config alone, in milliseconds."""
    from flexmoe.config.train import DATA_FORMATS, FREEZE_PLAN_NAMES

    if cfg.stage.freeze not in FREEZE_PLAN_NAMES:
        return f"stage.freeze={cfg.stage.freeze!r} is not one of {', '.join(FREEZE_PLAN_NAMES)}"
    fmt = cfg.data.get("format", "lm")
    if fmt not in DATA_FORMATS:
        return f"data.format={fmt!r} is not one of {', '.join(DATA_FORMATS)}"
    par, m = cfg.get("parallel"), cfg.model
    if par is None or cfg.init_from:
        return None
    heads, kv = m.num_heads, m.num_kv_heads or m.num_heads
    if par.tp > 1 and (heads % par.tp or kv % par.tp):
        return f"parallel.tp={par.tp} does not divide model.num_heads={heads} and model.num_kv_heads={kv}"
    if par.ep > 1 and m.num_experts % par.ep:
        return f"parallel.ep={par.ep} does not divide model.num_experts={m.num_experts}"
    return None


def cmd_train(argv: list[str]) -> int:
    """`flexmoe train`: a Hydra app over RunConfig; `--dry-run` prints sizes and exits."""
    import hydra
    from omegaconf import OmegaConf

    from flexmoe.config.store import register

    register()
    if "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"] + ["dry_run=true"]
    result: dict = {}

    @hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        problem = _early_check(cfg)
        if problem:  # refuse a bad layout before torch is even imported
            print(f"flexmoe train: error: {problem}", file=sys.stderr)
            sys.exit(2)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # a sweep: each job trains in its own numbered directory
            cfg.out_dir = hc.runtime.output_dir

        try:
            if cfg.dry_run:
                from flexmoe.config.model import ModelConfig
                from flexmoe.train.dry_run import dry_run, format_dry_run

                print(OmegaConf.to_yaml(cfg))
                mcfg = (load_config_of(cfg.init_from) if cfg.init_from else
                        ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
                info = dry_run(cfg, mcfg)
                print(format_dry_run(info))
                print(json.dumps(info, indent=1))
                result.update(info)
                return
            from flexmoe.train.trainer import train

            out = train(cfg)
        except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, not a traceback
            if os.environ.get("FLEXMOE_DEBUG"):
                raise
            print(f"flexmoe train: error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        result.update(out)
        if int(os.environ.get("RANK", "0")) != 0:  # one summary per run, not per rank
            return
        print(json.dumps({k: v for k, v in out.items() if k in (
            "final", "val_loss", "tokens_seen", "params_total", "params_active", "params_trainable",
            "flops_per_token", "memory_estimate_gib")}, indent=1))

    sys.argv = ["flexmoe train"] + argv
    _main()
    return 0


def cmd_prepare_data(argv: list[str]) -> int:
    """`flexmoe prepare-data`: tokenize text/jsonl/csv files into .npy shards with a manifest.

    With `--format sft` the inputs are chat jsonl files (`{"messages": [{"role", "content"}, ...]}`
    per line) and the output is SFT data for `flexmoe train data.format=sft`: tokens, a loss mask
    on assistant tokens only and example boundaries (see flexmoe.data.sft).
    """
    from flexmoe.data import load_tokenizer, prepare_data, train_bpe

    p = argparse.ArgumentParser(prog="flexmoe prepare-data", description=cmd_prepare_data.__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a Hugging Face tokenizer directory")
    p.add_argument("--train-bpe", type=int, default=0, metavar="VOCAB",
                   help="train a byte-level BPE of this size on the inputs and save it to --tokenizer")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--domain")
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", default="lm", choices=["lm", "sft"],
                   help="lm: plain text -> token shards; sft: chat jsonl ('messages') -> windows with an "
                        "assistant-only loss mask, for `flexmoe train data.format=sft`")
    a = p.parse_args(argv)
    if a.format == "sft":
        return _prepare_sft(a)
    if a.train_bpe:
        texts = (Path(f).read_text(errors="replace") for f in a.inputs)
        tok = train_bpe(texts, a.train_bpe, a.tokenizer)
    else:
        tok = load_tokenizer(a.tokenizer)
    m = prepare_data(a.inputs, a.out, tok, dtype=a.dtype, domain=a.domain, text_field=a.text_field,
                     overwrite=a.overwrite)
    print(f"{a.out}: {m['num_tokens']:,} tokens in {len(m['shards'])} shard(s), dtype {m['dtype']}")
    return 0


def _prepare_sft(a: argparse.Namespace) -> int:
    """`prepare-data --format sft`: chat jsonl -> tokens.npy, loss_mask.npy, doc_starts.npy + manifest."""
    from flexmoe.data import load_tokenizer
    from flexmoe.data.sft import prepare_sft

    # These options describe plain-text shards; silently ignoring them would surprise.
    for flag, value, default in (("--train-bpe", a.train_bpe, 0), ("--dtype", a.dtype, "auto"),
                                 ("--text-field", a.text_field, "text"), ("--domain", a.domain, None)):
        if value != default:
            raise ValueError(f"{flag} does not apply to --format sft; drop it")
    m = prepare_sft(a.inputs, a.out, load_tokenizer(a.tokenizer), overwrite=a.overwrite)
    print(f"{a.out}: {m['num_examples']:,} chat examples, {m['num_tokens']:,} tokens "
          f"({m['num_trained_tokens']:,} trained)")
    return 0


def cmd_router_embed(argv: list[str]) -> int:
    """`flexmoe router-embed`: router rows for one owner's data (or, with --public, the public row)."""
    from flexmoe.flex.router_init import attach_public_embedding, compute_router_embedding
    from flexmoe.model.docroute import DEFAULT_BUCKETS

    p = argparse.ArgumentParser(prog="flexmoe router-embed", description=cmd_router_embed.__doc__)
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


def cmd_branch(argv: list[str]) -> int:
    """`flexmoe branch`: dense public model -> the owner's 2-expert anchor model."""
    from safetensors.torch import load_file

    from flexmoe.flex.branch import branch

    p = argparse.ArgumentParser(prog="flexmoe branch", description=cmd_branch.__doc__)
    p.add_argument("public")
    p.add_argument("out")
    p.add_argument("--router-embedding", help="the owner's rows from `flexmoe router-embed`")
    p.add_argument("--router-bias", action="store_true", help="add FlexOlmo's non-positive per-expert bias")
    a = p.parse_args(argv)
    given = load_file(a.router_embedding) if a.router_embedding else {}
    print(branch(a.public, a.out, given.get("router_embedding"), router_bias=a.router_bias,
                 owner_ngram=given.get("domain_ngram")))
    return 0


def cmd_package(argv: list[str]) -> int:
    """`flexmoe package`: cut the trained expert out as a data-free package."""
    from flexmoe.flex.package import make_package

    p = argparse.ArgumentParser(prog="flexmoe package", description=cmd_package.__doc__)
    p.add_argument("trained")
    p.add_argument("out")
    p.add_argument("--owner", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--licence", default="unspecified")
    a = p.parse_args(argv)
    print(make_package(a.trained, a.out, owner=a.owner, domain=a.domain, licence=a.licence))
    return 0


def cmd_merge(argv: list[str]) -> int:
    """`flexmoe merge`: public model + expert packages -> one (N+1)-expert model."""
    from flexmoe.config.model import ROUTINGS
    from flexmoe.flex.merge import merge

    p = argparse.ArgumentParser(prog="flexmoe merge", description=cmd_merge.__doc__)
    p.add_argument("public")
    p.add_argument("packages", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int)
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--routing", default="auto", choices=["auto", *ROUTINGS],
                   help="routing policy of the merged model (see model.routing); auto: anchor_ngram when every "
                        "package carries an n-gram profile, else topk (the only policy export-hf can write)")
    p.add_argument("--shared", default="public", choices=["public", "average"],
                   help="shared tensors: the public copy (FlexOlmo) or the mean of the packages' copies (BAR)")
    p.add_argument("--router-rows", default="raw", choices=["raw", "common_norm", "centred_norm"],
                   help="rescale router rows at merge time (see flex/merge.py ROW_TRANSFORMS)")
    p.add_argument("--router-cosine-temp", type=float, default=0.0, metavar="T",
                   help="route by cosine similarity of hidden state and row over temperature T (0: dot product)")
    a = p.parse_args(argv)
    merge(a.public, a.packages, a.out, top_k=a.top_k, norm_topk_prob=a.norm_topk_prob, routing=a.routing,
          shared=a.shared, router_rows=a.router_rows, router_cosine_temp=a.router_cosine_temp)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """`flexmoe eval`: perplexity per domain, optionally with experts opted out and the soup baseline."""
    from flexmoe.convert.safetensors_io import load_model
    from flexmoe.data import TokenWindows
    from flexmoe.eval.baselines import soup_model
    from flexmoe.eval.perplexity import model_logprobs, perplexity
    from flexmoe.flex.optout import expert_mask

    p = argparse.ArgumentParser(prog="flexmoe eval", description=cmd_eval.__doc__)
    p.add_argument("model")
    p.add_argument("--data", action="append", required=True, metavar="DOMAIN=DIR")
    p.add_argument("--opt-out", default="", help="comma-separated owners or domains to switch off")
    p.add_argument("--soup", action="store_true", help="also evaluate the model soup of the experts")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-windows", type=int, default=64)
    p.add_argument("--route-embedder", metavar="PATH",
                   help="document routing by this local sentence-transformers model (anchor_* merges; "
                        "needs --domain-embedding for every expert)")
    p.add_argument("--domain-embedding", action="append", default=[], metavar="NAME=FILE",
                   help="an expert's (or public's) router-embed --embedder output, for --route-embedder")
    p.add_argument("--route-chunk", type=int, default=32, help="tokens per routing decision of --route-embedder")
    a = p.parse_args(argv)
    model, cfg, meta = load_model(a.model)
    model.eval()
    data = {}
    for item in a.data:
        d, path = _name_eq_value(item, "--data", p)
        data[d] = TokenWindows(path, a.seq_len)
    router = None
    if a.route_embedder:
        from flexmoe.data import load_tokenizer
        from flexmoe.flex.docembed import EmbedderRouter, load_embedder, read_domain_embeddings

        if not cfg.is_moe or cfg.routing == "topk":
            raise ValueError(f"--route-embedder needs a merge with an anchor_* routing; {a.model} routes "
                             f"{'dense' if not cfg.is_moe else repr(cfg.routing)} (merge with --routing anchor_top1)")
        files = dict(_name_eq_value(x, "--domain-embedding", p) for x in a.domain_embedding)
        embs = read_domain_embeddings(meta.get("experts") or [], files)
        # the embedder reads text: decode with the tokenizer that made the eval data
        tok = load_tokenizer(next(iter(data.values())).manifest["tokenizer"])
        router = EmbedderRouter(load_embedder(a.route_embedder), embs, tok.decode, chunk=a.route_chunk)
    mask = expert_mask(meta.get("experts") or [], a.opt_out.split(",")) if cfg.is_moe else None
    rows = {"model": {d: perplexity(model_logprobs(model, mask, router), w, a.num_windows) for d, w in data.items()}}
    if a.soup and cfg.is_moe:
        s = soup_model(model)
        rows["soup"] = {d: perplexity(model_logprobs(s), w, a.num_windows) for d, w in data.items()}
    print(json.dumps({"perplexity": rows}, indent=1))
    return 0


def _name_eq_value(item: str, flag: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    if "=" not in item:
        parser.error(f"{flag} {item!r}: expected NAME=PATH")
    name, value = item.split("=", 1)
    return name, value


def cmd_quickstart(argv: list[str]) -> int:
    """`flexmoe quickstart`: the whole lifecycle on built-in text; writes report.md and report.json.

    `recipe=bar`: the post-training version (SFT experts on built-in chat data, merged with
    shared=average|public, router tuning); writes bar_report.md and bar_report.json.
    """
    from flexmoe.quickstart import quickstart_main

    quickstart_main(argv)
    return 0


COMMANDS = {
    "prepare-data": cmd_prepare_data, "train": cmd_train, "router-embed": cmd_router_embed,
    "branch": cmd_branch, "package": cmd_package, "merge": cmd_merge, "eval": cmd_eval,
    "quickstart": cmd_quickstart,
}


def _all_commands() -> dict:
    from flexmoe.convert.commands import COMMANDS as convert_commands
    from flexmoe.flex.commands import COMMANDS as flex_commands

    return {**COMMANDS, **convert_commands, **flex_commands}


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a subcommand; user errors become one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    # Only import the conversion commands (and torch with them) when they are asked for, so a
    # bad `flexmoe train` override is refused before any heavy import.
    commands = COMMANDS if argv[0] in COMMANDS else _all_commands()
    cmd = commands.get(argv[0])
    if cmd is None:
        print(f"flexmoe: unknown command {argv[0]!r}; choose from {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except (ValueError, FileNotFoundError, KeyError) as e:  # CheckpointError and DataError are ValueErrors
        if os.environ.get("FLEXMOE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"flexmoe {argv[0]}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
