"""Routing ablation (issue 3): which settings make the merged model as good as each expert on its
own domain, with local opt-out?

Trains one public model, then one set of experts per *training* setting (share of public data,
router bias), and evaluates every *merge-time* setting (routing policy, router-row scaling, top-k)
on the same experts. Corpora: the built-in ones (code, legal, math), and with --shared the real
corpora in ../shared/corpora (GSM8K as math, AG News as news, Shakespeare as creative, the standard
library as code); the public model is always trained on the built-in public text.

    python benchmarks/routing_ablation.py --out /tmp/ablation [--shared] [--quick]

Prints one table per corpus set and writes ablation.json. Columns: merged/expert ratio per domain,
the worst opt-out drift on another domain, merged/public on public text, merged/soup (mean over
expert domains). A row marked (opt-in) uses data pooled across owners; no default may. Rows marked
[hf release] are the `flexmoe export-hf` releases of the topk2 and anchor_ngram merges, run by
transformers (stock FlexOlmo, and remote code with the n-gram router), opt-out included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexmoe.recipes.common import run_step as _run  # noqa: E402

MERGE_SETTINGS = [  # (name, routing, router_rows, top_k[, router cosine temperature])
    ("topk2", "topk", "raw", 2), ("topk3", "topk", "raw", 3), ("topk2+common_norm", "topk", "common_norm", 2),
    ("topk2+centred_norm", "topk", "centred_norm", 2), ("anchor_top1", "anchor_top1", "raw", 2),
    ("anchor_top1+centred_norm", "anchor_top1", "centred_norm", 2), ("anchor_doc", "anchor_doc", "raw", 2),
    ("anchor_ngram", "anchor_ngram", "raw", 2), ("topk2+cosine0.1", "topk", "raw", 2, 0.1),
    ("topk2+cosine0.03", "topk", "raw", 2, 0.03),
    # document routing by a sentence embedder (flex/docembed.py): a merge with anchor pairs whose
    # domain expert per 32-token chunk is picked from the embedding of the text before the chunk
    ("anchor_embed", "anchor_top1", "raw", 2),
    # FlexOlmo's router tuning: the topk2 merge's router rows trained on small samples of every
    # owner's data and of the public data (pooled, so opt-in and never a default)
    ("topk2+router_tune", "topk", "raw", 2),
    # owner-fitted rows (recipes/owner_router.py): each owner runs `package --fit-router` on its own
    # data + public windows; `merge --routing topk --calibrate owner` stacks them (nothing pooled)
    ("topk2+owner_rows", "topk", "raw", 2),
    # the pooled reference (benchmarks/topk_calibration.py "rows/P+O a0=0.1 (pooled)"): every row
    # refitted in one place on public windows + each owner's own training windows, the document
    # router's targets, anchor-only tokens weighed 0.1 (pooled, so opt-in and never a default)
    ("topk2+pooled_rows", "topk", "raw", 2),
]
POOLED_ROWS = dict(public_windows=96, own_windows=32, steps=300, anchor_only_weight=0.1)
EMBED_CHUNK = 32
ROUTER_TUNE = dict(fraction=0.05, steps=40, lr=1e-2)
TRAIN_SETTINGS = {  # name -> (share of public data in expert batches, router bias, rows from the embedder)
    "mix0": (0.0, False, False), "mix0.25": (0.25, False, False), "mix0.5": (0.5, False, False),
    "mix0.25+bias": (0.25, True, False), "mix0.25+embedder": (0.25, False, True)}


def shared_domains(out: Path, max_bytes: int) -> dict[str, dict[str, list[Path]]]:
    """GSM8K / AG News / Shakespeare / stdlib as jsonl train/val files (read in place, never copied
    into the project)."""
    import csv
    import random
    import sysconfig

    root = ROOT.parent / "shared" / "corpora"
    if not root.is_dir():
        return {}
    docs: dict[str, list[str]] = {}
    with open(root / "gsm8k_train.jsonl") as f:
        docs["math"] = [(lambda r: r["question"] + "\n" + r["answer"])(json.loads(l)) for l in f]
    with open(root / "agnews_7600.csv", newline="") as f:
        docs["news"] = [f"{r[1]}\n{r[2]}".replace("\\", "\n") for r in csv.reader(f)]
    text = (root / "tinyshakespeare.txt").read_text()
    docs["creative"] = [p for p in text.split("\n\n") if p.strip()]
    std = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    docs["code"] = [p.read_text(errors="replace")[:8000] for p in std]
    out_files: dict[str, dict[str, list[Path]]] = {}
    for d, items in docs.items():
        rng = random.Random(0)
        rng.shuffle(items)
        kept, size = [], 0
        for t in items:
            if size > max_bytes:
                break
            kept.append(t)
            size += len(t)
        n_val = max(1, len(kept) // 20)
        for split, part in (("val", kept[:n_val]), ("train", kept[n_val:])):
            p = out / "shared_corpora" / d / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
            out_files.setdefault(d, {})[split] = [p]
    return out_files


def evaluate(public, merged_dir, experts, val, seq_len, windows, router=None) -> dict:
    """Perplexities of the merge, its soup and each opt-out. `router`: an EmbedderRouter whose
    choice reaches the model as `route_choice` (the anchor_embed row)."""
    from flexmoe.train.load import load_model
    from flexmoe.data import TokenWindows
    from flexmoe.eval.baselines import soup_model
    from flexmoe.train.perplexity import model_logprobs, perplexity
    from flexmoe.flex.optout import expert_mask

    W = {d: TokenWindows(p, seq_len) for d, p in val.items()}
    row = lambda m, mask=None: {d: perplexity(model_logprobs(m, mask, router), w, windows) for d, w in W.items()}  # noqa
    merged, _, meta = load_model(merged_dir)
    merged.eval()
    res = {"merged": row(merged), "soup": {d: perplexity(model_logprobs(soup_model(merged)), w, windows)
                                           for d, w in W.items()}}
    for d in experts:
        res[f"without/{d}"] = row(merged, expert_mask(meta["experts"], [d]))
    return res


# Merges with a Hugging Face release (export-hf): stock FlexOlmo for top-k, remote code for anchor_*.
HF_RELEASES = ("topk2", "anchor_ngram")


def evaluate_release(merged_dir: Path, work: Path, domains, val, seq_len, windows, soup: dict) -> dict | None:
    """`evaluate` through transformers: the `flexmoe export-hf` release of the merge, loaded by
    AutoModelForCausalLM (trust_remote_code for anchor_*), so the cells are what users of the release
    get. Opt-out: the remote-code release's `expert_mask`; a stock top-k release has none, so its
    opt-out rows are the releases of `flexmoe remove-expert` (what such a user would run). The soup
    is a dense model, not a release: its cells are the native ones. None without transformers."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import torch

    from flexmoe.convert.hf_export import export_hf
    from flexmoe.data import TokenWindows
    from flexmoe.flex.optout import expert_mask
    from flexmoe.config import ModelConfig
    from flexmoe.io.model_dir import read_model_meta
    from flexmoe.train.perplexity import perplexity

    W = {d: TokenWindows(p, seq_len) for d, p in val.items()}
    meta = read_model_meta(merged_dir)
    remote = ModelConfig.load(Path(merged_dir) / "config.json").routing != "topk"

    def row(release: Path, mask=None) -> dict:
        model = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True).eval()
        extra = {} if mask is None else {"expert_mask": mask}

        def logprobs(tokens):
            with torch.no_grad():
                return torch.log_softmax(model(tokens, use_cache=False, **extra).logits.float(), dim=-1)

        return {d: perplexity(logprobs, w, windows) for d, w in W.items()}

    release = work / "hf"
    if not (release / "config.json").exists():
        export_hf(merged_dir, release, verify=False, overwrite=True)
    res = {"merged": row(release), "soup": soup}
    for d in domains:
        if remote:
            res[f"without/{d}"] = row(release, expert_mask(meta["experts"], [d]))
            continue
        smaller = work / f"without-{d}"
        if not (smaller / "hf" / "config.json").exists():
            _run([sys.executable, "-m", "flexmoe.cli", "remove-expert", str(merged_dir), str(smaller / "native"),
                  "--expert", d, "--overwrite"], work / "remove.log", 1)
            export_hf(smaller / "native", smaller / "hf", verify=False, overwrite=True)
        res[f"without/{d}"] = row(smaller / "hf")
    return res


def embedder_router(embedder_path, merged_dir, train_dirs: dict[str, Path], seq_len: int):
    """An EmbedderRouter over the merged model's experts, each domain embedding made from that
    owner's own training data (row 0 from the public data), as `router-embed --embedder` does."""
    from flexmoe.train.load import load_model
    from flexmoe.data import ByteTokenizer, TokenWindows
    from flexmoe.flex.docembed import EmbedderRouter, domain_embedding, load_embedder
    from flexmoe.flex.router_init import sample_texts

    import torch

    emb = load_embedder(embedder_path)
    _, _, meta = load_model(merged_dir)
    rows = [domain_embedding(emb, sample_texts(TokenWindows(train_dirs[e["domain"]], seq_len)))
            for e in meta["experts"]]
    tok = ByteTokenizer()
    return EmbedderRouter(emb, torch.stack(rows), tok.decode, chunk=EMBED_CHUNK)


def proxy_data(out: Path, train_dir: Path, seq_len: int, fraction: float) -> Path:
    """A small sample (`fraction` of the windows, at least 16) of one owner's training data, as a
    prepared data directory: the router-tuning proxy."""
    from flexmoe.data import ByteTokenizer, TokenWindows, prepare_data
    from flexmoe.flex.router_init import sample_texts

    if (out / "manifest.json").exists():
        return out
    w = TokenWindows(train_dir, seq_len)
    src = out.with_suffix(".jsonl")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(w, max(16, round(len(w) * fraction)))))
    prepare_data([src], out, ByteTokenizer(), progress=False)
    return out


def pooled_rows_merge(public, pkgs, out_dir: Path, public_data: Path, own_data: list[Path], seq_len: int) -> Path:
    """The pooled top-k calibration (topk_calibration.py's "rows/P+O a0=0.1 (pooled)") as a merge:
    the document-routed (`anchor_ngram`) merge into a scratch directory, recipes/calibrate.py's
    calibrate_model on POOLED_ROWS["public_windows"] public windows plus POOLED_ROWS["own_windows"]
    of each owner's training data (the document router's targets, anchor-only tokens weighed
    POOLED_ROWS["anchor_only_weight"]), then the top-k merge with the fitted rows, as
    recipes/calibrate.calibrated_merge does with generated text."""
    import torch

    from flexmoe.data import TokenWindows
    from flexmoe.flex.merge import merge
    from flexmoe.io.files import scratch_dir
    from flexmoe.recipes import calibrate as cal
    from flexmoe.train.load import load_model

    t0 = time.perf_counter()
    lines: list[str] = []
    with scratch_dir(out_dir) as scratch:
        merge(public, pkgs, scratch / "doc", top_k=2, routing="anchor_ngram")
        model_doc, _, _ = load_model(scratch / "doc", verify=False)
        model_doc.eval()
        parts = [cal.public_text(TokenWindows(public_data, seq_len), POOLED_ROWS["public_windows"], seq_len)]
        parts += [cal.public_text(TokenWindows(d, seq_len), POOLED_ROWS["own_windows"], seq_len) for d in own_data]
        tokens = torch.cat(parts)
        tensors = cal.calibrate_model(model_doc, tokens, mode="rows", steps=POOLED_ROWS["steps"],
                                      anchor_only_weight=POOLED_ROWS["anchor_only_weight"], log=lines.append)
    record = {"mode": "rows", "pooled": True, **POOLED_ROWS, "seq_len": seq_len, "tokens": int(tokens.numel()),
              "layers": lines, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"topk2+pooled_rows: fitted on {tokens.numel()} tokens in {record['seconds']} s; " + "; ".join(lines),
          flush=True)
    return merge(public, pkgs, out_dir, top_k=2, routing="topk", verify=False, router_override=tensors,
                 extra_meta={"calibration": record})


def summarise(res: dict, expert_ppl: dict, public_ppl: dict, domains: list[str]) -> dict:
    """The report's routing-quality numbers (flexmoe.recipes.report.routing_quality) of one merge:
    drift is over every other eval domain, public text included."""
    from flexmoe.recipes.report import quality_claims, routing_quality

    ppl = {"merged": res["merged"], "soup": res["soup"], "public": public_ppl,
           **{f"merged-without/{d}": res[f"without/{d}"] for d in domains},
           **{f"expert/{d}": {d: expert_ppl[d]} for d in domains}}
    q = routing_quality(ppl, domains)
    return {
        **{f"ratio/{d}": q["expert_ratio"][d] for d in domains},
        "max_optout_drift": max(q["opt_out_drift"].values()), "public_ratio": q["public_ratio"],
        "vs_soup": 1 - q["soup_gain"], "all_bounds_hold": all(ok for _, ok in quality_claims(q)),
    }


def run_set(name, corpora, public, out, args, jobs) -> list[dict]:
    """Experts per training setting, then every merge setting, for one corpus set."""
    from flexmoe.train.load import load_model
    from flexmoe.data import ByteTokenizer, TokenWindows, prepare_data
    from flexmoe.train.perplexity import model_logprobs, perplexity

    tok = ByteTokenizer()
    data = {}
    for d, splits in corpora.items():
        for split, files in splits.items():
            p = out / name / "data" / d / split
            if not (p / "manifest.json").exists():
                prepare_data(files, p, tok, domain=d, progress=False)
            data.setdefault(d, {})[split] = p
    domains = [d for d in corpora if d != "public"]
    val = {d: data[d]["val"] for d in ["public", *domains]}
    flexmoe = [sys.executable, "-m", "flexmoe.cli"]
    train_settings = [(t, *TRAIN_SETTINGS[t]) for t in args.train]
    rows = []
    public_model, _, _ = load_model(public)
    public_ppl = {d: perplexity(model_logprobs(public_model.eval()), TokenWindows(p, args.seq_len), args.windows)
                  for d, p in val.items()}
    for tname, mix, bias, use_embedder in train_settings:
        base = out / name / tname
        branch_from = public
        if use_embedder:
            # every row from the embedder, the public one too, so rows stay comparable
            branch_from = out / "public-embedder" / "final"
            if not (branch_from / "flexmoe.json").exists():
                import shutil

                shutil.copytree(public, branch_from, dirs_exist_ok=True)
                _run(flexmoe + ["router-embed", "--model", str(branch_from), "--data", str(args.public_data),
                                "--public", "--seq-len", str(args.seq_len), "--embedder", str(args.embedder)],
                     out / "public.log", 2)

        def owner(d):
            o = base / d
            o.mkdir(parents=True, exist_ok=True)
            log = o / "log.txt"
            if (o / "package" / "manifest.json").exists():
                return o / "package"
            _run(flexmoe + ["router-embed", "--model", str(branch_from), "--data", str(data[d]["train"]), "--out",
                            str(o / "rows.safetensors"), "--seq-len", str(args.seq_len)]
                 + (["--embedder", str(args.embedder)] if use_embedder else []), log, 1)
            _run(flexmoe + ["branch", str(branch_from), str(o / "anchor"), "--router-embedding", str(o / "rows.safetensors")]
                 + (["--router-bias"] if bias else []), log, 1)
            _run(flexmoe + ["train", f"out_dir={o / 'train'}", "stage=expert_anchor", f"init_from={o / 'anchor'}",
                            f"+data.train.{d}={data[d]['train']}",
                            # public_mix=0 with a public source in data.train would weigh it like the
                            # owner's data (a 50/50 mixture; seen: mix0 gave mix0.5's numbers).
                            *([f"+data.train.public={args.public_data}"] if mix > 0 else []),
                            f"stage.public_mix={mix}", f"trainer.steps={args.expert_steps}", "optim.lr=2e-3",
                            f"data.seq_len={args.seq_len}", "trainer.threads=1", "trainer.log_every=50"], log, 1)
            _run(flexmoe + ["package", str(o / "train" / "final"), str(o / "package"), "--owner", d, "--domain", d],
                 log, 1)
            return o / "package"

        with ThreadPoolExecutor(jobs) as pool:
            pkgs = list(pool.map(owner, domains))
        expert_ppl = {}
        for d in domains:
            m, _, _ = load_model(base / d / "train" / "final")
            expert_ppl[d] = perplexity(model_logprobs(m.eval()), TokenWindows(val[d], args.seq_len), args.windows)
        for mname, routing, rows_t, k, *cos in [m for m in MERGE_SETTINGS if m[0] in args.merge]:
            mdir = base / f"merged-{mname}"
            if not (mdir / "flexmoe.json").exists() and mname not in ("topk2+owner_rows", "topk2+pooled_rows"):
                _run(flexmoe + ["merge", str(branch_from), *map(str, pkgs), "--out", str(mdir), "--top-k", str(k),
                                "--routing", routing, "--router-rows", rows_t,
                                "--router-cosine-temp", str(cos[0] if cos else 0.0)], base / "merge.log", min(jobs, 2))
            if mname == "topk2+owner_rows" and not (mdir / "flexmoe.json").exists():
                fitted = []
                for d, pkg in zip(domains, pkgs):
                    fit = pkg.parent / "package-fit"
                    if not (fit / "manifest.json").exists():
                        _run(flexmoe + ["package", str(pkg.parent / "train" / "final"), str(fit), "--owner", d,
                                        "--domain", d, "--fit-router", str(data[d]["train"]), "--fit-router-public",
                                        str(args.public_data), "--fit-router-seq-len", str(args.seq_len)],
                             pkg.parent / "log.txt", 1)
                    fitted.append(fit)
                _run(flexmoe + ["merge", str(branch_from), *map(str, fitted), "--out", str(mdir), "--routing", "topk",
                                "--calibrate", "owner"], base / "merge.log", 1)
            if mname == "topk2+pooled_rows" and not (mdir / "flexmoe.json").exists():
                pooled_rows_merge(branch_from, pkgs, mdir, args.public_data, [data[d]["train"] for d in domains],
                                  args.seq_len)
            router = None
            if mname == "anchor_embed":
                if not args.embedder:
                    print("anchor_embed: no embedder (pip install -e '.[embed]' or --embedder PATH); skipped",
                          file=sys.stderr)
                    continue
                router = embedder_router(args.embedder, mdir, {"public": args.public_data,
                                                               **{d: data[d]["train"] for d in domains}}, args.seq_len)
            if "router_tune" in mname:
                tuned = base / f"tuned-{mname}"
                if not (tuned / "final" / "flexmoe.json").exists():
                    proxies = {d: proxy_data(base / "proxy" / d, src, args.seq_len, ROUTER_TUNE["fraction"])
                               for d, src in [("public", args.public_data), *((d, data[d]["train"]) for d in domains)]}
                    _run(flexmoe + ["train", f"out_dir={tuned}", "stage=router_tune", f"init_from={mdir}",
                                    *(f"+data.train.{d}={p}" for d, p in proxies.items()),
                                    f"data.seq_len={args.seq_len}", f"trainer.steps={ROUTER_TUNE['steps']}",
                                    f"optim.lr={ROUTER_TUNE['lr']}", "optim.warmup_steps=2",
                                    f"trainer.threads={jobs}", "trainer.log_every=10"], base / "router_tune.log", jobs)
                mdir = tuned / "final"
            res = evaluate(public, mdir, domains, val, args.seq_len, args.windows, router)
            rows.append({"corpora": name, "train": tname, "merge": mname, "windows": args.windows,
                         **summarise(res, expert_ppl, public_ppl, domains), "perplexity": res,
                         "expert_ppl": expert_ppl, "public_ppl": public_ppl})
            print_row(rows[-1], domains)
            if mname in HF_RELEASES and not args.no_hf:
                hf = evaluate_release(mdir, base / f"release-{mname}", domains, val, args.seq_len, args.windows,
                                      res["soup"])
                if hf is not None:
                    rows.append({"corpora": name, "train": tname, "merge": f"{mname} [hf release]",
                                 "windows": args.windows, **summarise(hf, expert_ppl, public_ppl, domains),
                                 "perplexity": hf, "expert_ppl": expert_ppl, "public_ppl": public_ppl})
                    print_row(rows[-1], domains)
    return rows


def _label(r: dict) -> str:
    """The merge setting's name; router tuning and pooled rows pool data across owners, so they say opt-in."""
    return r["merge"] + (" (opt-in)" if "router_tune" in r["merge"] or "pooled" in r["merge"] else "")


def print_row(r: dict, domains: list[str]) -> None:
    cells = " ".join(f"{r[f'ratio/{d}']:6.3f}" for d in domains)
    print(f"{r['corpora']:8} {r['train']:16} {_label(r):28} {cells}  drift {r['max_optout_drift']:6.3f}  "
          f"public {r['public_ratio']:5.3f}  vs-soup {r['vs_soup']:5.3f}  "
          f"{'all bounds hold' if r['all_bounds_hold'] else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", action="store_true", help="also run on ../shared/corpora")
    ap.add_argument("--quick", action="store_true", help="one training setting, fewer steps")
    ap.add_argument("--public-steps", type=int, default=600)
    ap.add_argument("--expert-steps", type=int, default=250)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--merge", default="", help="comma-separated merge settings to evaluate (default: all)")
    ap.add_argument("--public-model", help="reuse this trained public model directory instead of training one")
    ap.add_argument("--no-hf", action="store_true",
                    help=f"skip the rows of the Hugging Face releases ({', '.join(HF_RELEASES)} through transformers)")
    ap.add_argument("--embedder", help="local sentence-transformers model for the embedder rows (default: the "
                    "bundled MiniLM of extra `embed`, when installed)")
    ap.add_argument("--jobs", type=int, default=0, help="owners trained at once (default: min(cores, 3))")
    ap.add_argument("--only-shared", action="store_true", help="with --shared: skip the built-in corpus set")
    ap.add_argument("--train", default=",".join(TRAIN_SETTINGS),
                    help=f"comma-separated training settings among {', '.join(TRAIN_SETTINGS)}")
    args = ap.parse_args()
    args.train = [t for t in args.train.split(",") if t]
    names = [m[0] for m in MERGE_SETTINGS]
    args.merge = [m for m in args.merge.split(",") if m] if args.merge else names
    if [m for m in args.merge if m not in names]:
        ap.error(f"--merge: unknown setting(s) {[m for m in args.merge if m not in names]}; choose from {', '.join(names)}")
    unknown = [t for t in args.train if t not in TRAIN_SETTINGS]
    if unknown:
        ap.error(f"--train: unknown setting(s) {unknown}; choose from {', '.join(TRAIN_SETTINGS)}")
    if not args.embedder:
        from flexmoe.flex.docembed import bundled_embedder_path

        args.embedder = bundled_embedder_path()
    if not args.embedder and "mix0.25+embedder" in args.train:
        print("mix0.25+embedder: no embedder (pip install -e '.[embed]' or --embedder PATH); skipped", file=sys.stderr)
        args.train.remove("mix0.25+embedder")
    if args.quick:
        args.train = ["mix0.25"]
        args.public_steps, args.expert_steps = min(args.public_steps, 300), min(args.expert_steps, 120)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from flexmoe.data import ByteTokenizer, build_builtin_corpora, prepare_data

    t0 = time.perf_counter()
    builtin = build_builtin_corpora(out / "corpora")
    tok = ByteTokenizer()
    args.public_data = out / "public_data" / "train"
    for split in ("train", "val"):
        if not (out / "public_data" / split / "manifest.json").exists():
            prepare_data(builtin["public"][split], out / "public_data" / split, tok, progress=False)
    public_run = out / "public"
    if args.public_model and not (public_run / "final" / "flexmoe.json").exists():
        import shutil

        # Reuse a trained public model (e.g. a quickstart's); its router row and n-gram profile are
        # made again below from this run's public data.
        shutil.copytree(args.public_model, public_run / "final")
        _run([sys.executable, "-m", "flexmoe.cli", "router-embed", "--model", str(public_run / "final"),
              "--data", str(args.public_data), "--public", "--seq-len", str(args.seq_len)], out / "public.log", args.jobs or 2)
    if not (public_run / "final" / "flexmoe.json").exists():
        _run([sys.executable, "-m", "flexmoe.cli", "train", f"out_dir={public_run}",
              f"+data.train.public={args.public_data}", f"trainer.steps={args.public_steps}", "optim.lr=3e-3",
              f"data.seq_len={args.seq_len}", "trainer.log_every=100"], out / "public.log", os.cpu_count() or 1)
        _run([sys.executable, "-m", "flexmoe.cli", "router-embed", "--model", str(public_run / "final"),
              "--data", str(args.public_data), "--public", "--seq-len", str(args.seq_len)], out / "public.log", args.jobs or 2)
    public = public_run / "final"
    sets = {} if args.only_shared and args.shared else {"builtin": {d: builtin[d] for d in ("public", "code", "legal", "math")}}
    if args.shared:
        shared = shared_domains(out, 1_200_000)
        if shared:
            sets["shared"] = {"public": builtin["public"], **shared}
        else:
            print("../shared/corpora not found: skipping the shared-corpora run", file=sys.stderr)
    print(f"{'corpora':8} {'train':16} {'merge':28} merged/expert per domain  ...")
    rows = []
    for name, corpora in sets.items():
        rows += run_set(name, corpora, public, out, args, jobs=args.jobs or min(os.cpu_count() or 1, 3))
    # Rows of earlier runs into the same --out stay unless this run measured the same setting, so
    # the table can be built up setting by setting.
    path, key = out / "ablation.json", lambda r: (r["corpora"], r["train"], r["merge"], r.get("windows"))
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    fresh = {key(r) for r in rows}
    rows = [r for r in old if key(r) not in fresh] + rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    tmp.replace(path)
    print(f"wrote {path} ({len(rows)} rows; this run {time.perf_counter() - t0:.0f} s)")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Every row of ablation.json as one markdown table (the README's format)."""
    print("\n| corpora | training | merge setting | windows | merged/expert per domain | drift | public | vs soup | bounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["corpora"], r["train"], r["merge"], r.get("windows") or 0)):
        doms = [k[6:] for k in r if k.startswith("ratio/")]
        cells = ", ".join(f"{r['ratio/' + d]:.3f}" for d in doms)
        print(f"| {r['corpora']} | {r['train']} | {_label(r)} | {r.get('windows', '?')} | {cells} | "
              f"{r['max_optout_drift']:.1%} | {r['public_ratio']:.3f} | {r['vs_soup']:.3f} | "
              f"{'all hold' if r['all_bounds_hold'] else 'no'} |")


if __name__ == "__main__":
    main()
