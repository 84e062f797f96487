"""`flexmoe quickstart recipe=bar`: a small post-training (BAR) run on built-in chat data.

public model (pretrained briefly on built-in public text, or reused) -> per domain (math:
arithmetic Q&A, code: stdlib docstring -> function): router embedding -> branch -> two SFT experts
from the same anchor, same data, steps and seed:

    sft     stage=sft: embeddings and LM head train with the owner's expert (BAR)
    frozen  stage=midtrain: every shared tensor frozen, only the expert trains (FlexOlmo)

-> merge the sft experts with shared=average and with shared=public (and the frozen ones) ->
router tuning of the shared=average merge on a stated fraction of each owner's chats ->
bar_report.md and bar_report.json: masked SFT validation loss (assistant tokens only) per domain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmoe.io.keys import is_router_key
from flexmoe.recipes.common import parse_overrides, run_step, say, train_public_model
from flexmoe.io.files import atomic_write_text

DOMAINS = ("math", "code")
# variant -> (stage config, freeze plan); the frozen variant's public_mix is zeroed below so both
# see exactly the same batches.
VARIANTS = {"sft": "sft", "frozen": "midtrain"}


@dataclass
class BarConfig:
    """Settings of `flexmoe quickstart recipe=bar`, as `key=value` overrides (lists comma-separated).

    The defaults fit well inside 15 minutes on 2 CPU cores (see README, "The BAR quickstart")."""

    recipe: str = "bar"
    out_dir: str = "bar-out"
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    public_model: str = ""  # an existing dense public model dir to reuse; "": pretrain one here
    max_bytes_per_domain: int = 600_000  # public text for the public model
    seq_len: int = 256
    batch_size: int = 16
    public_steps: int = 300
    public_lr: float = 3e-3
    n_math: int = 3000  # arithmetic chats
    n_code: int = 1500  # docstring -> function chats (at most; the stdlib decides)
    sft_steps: int = 120
    sft_lr: float = 2e-3
    top_k: int = 2
    # The merges' routing (`flexmoe merge --routing`): auto routes by document n-gram profile when
    # every package carries one (each owner's is made from its own chats), else per-token top-k.
    routing: str = "auto"
    router_tune_steps: int = 40  # 0: skip router tuning
    router_tune_fraction: float = 0.05  # of each owner's training chats
    router_tune_lr: float = 1e-2
    eval_windows: int = 32
    jobs: int = 0  # parallel training processes; 0: one per CPU core
    seed: int = 0

    @classmethod
    def from_overrides(cls, argv: list[str]) -> "BarConfig":
        """Parse `key=value` overrides (the same style as `flexmoe quickstart`)."""
        cfg = parse_overrides(cls, argv, "quickstart recipe=bar")
        unknown = sorted(set(cfg.domains) - set(DOMAINS))
        if unknown or not cfg.domains:
            raise ValueError(f"quickstart recipe=bar: domains={','.join(cfg.domains)}; choose from {', '.join(DOMAINS)}")
        if not 0 < cfg.router_tune_fraction <= 1:
            raise ValueError(f"quickstart recipe=bar: router_tune_fraction={cfg.router_tune_fraction} must be in (0, 1]")
        return cfg


def render_text(jsonl: Path, out: Path) -> Path:
    """The chats of `jsonl` rendered as plain text (the SFT template), for router embeddings,
    which read ordinary token shards."""
    from flexmoe.data.sft import render_simple

    lines = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            lines.append("".join(text for text, _ in render_simple(json.loads(line)["messages"])))
    atomic_write_text(out, "\n".join(lines))
    return out


def sample_chats(jsonl: Path, out: Path, fraction: float, seed: int) -> Path:
    """A seeded `fraction` (at least one) of the chats in `jsonl`: the router-tuning proxy."""
    lines = [l for l in jsonl.read_text(encoding="utf-8").splitlines() if l.strip()]
    n = max(1, round(len(lines) * fraction))
    keep = sorted(random.Random(seed).sample(range(len(lines)), n))
    atomic_write_text(out, "".join(lines[i] + "\n" for i in keep))
    return out


def run_bar_quickstart(cfg: BarConfig) -> dict[str, Any]:
    """Run the BAR post-training recipe and write bar_report.md and bar_report.json; returns the report."""
    from flexmoe.data import ByteTokenizer, build_builtin_corpora, prepare_data
    from flexmoe.data.chat_corpora import build_chat_corpora
    from flexmoe.data.sft import prepare_sft

    t0 = time.perf_counter()
    out = Path(cfg.out_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flexmoe = [sys.executable, "-m", "flexmoe.cli"]
    cores = os.cpu_count() or 1
    jobs = cfg.jobs or min(cores, 2 * len(cfg.domains))
    threads_each = max(1, cores // jobs)
    tok = ByteTokenizer()

    # 1. Chat data (SFT format), and the same chats as plain text for the router embeddings.
    say("building chat corpora (arithmetic Q&A, stdlib docstring -> function)", t0)
    chats = build_chat_corpora(out / "chats", n_math=cfg.n_math, n_code=cfg.n_code, seed=cfg.seed)
    sft_data: dict[str, dict[str, Path]] = {}
    text_data: dict[str, Path] = {}
    for d in cfg.domains:
        for split in ("train", "val"):
            p = out / "data" / d / split
            if not (p / "manifest.json").exists():
                prepare_sft([chats[d][split]], p, tok, overwrite=True)
            sft_data.setdefault(d, {})[split] = p
        text_data[d] = out / "data" / d / "text"
        if not (text_data[d] / "manifest.json").exists():
            txt = render_text(chats[d]["train"], out / "chats" / d / "train.txt")
            prepare_data([txt], text_data[d], tok, domain=d, progress=False, overwrite=True)

    # 2. The public model: reused, or pretrained briefly on built-in public text.
    if cfg.public_model:
        public = Path(cfg.public_model).resolve()
        if not (public / "flexmoe.json").is_file():
            raise ValueError(f"quickstart recipe=bar: public_model={cfg.public_model}: not a model directory "
                             "(no flexmoe.json)")
        if not (json.loads((public / "flexmoe.json").read_text()).get("router_embedding") or {}).get("router_public"):
            raise ValueError(f"quickstart recipe=bar: public_model={cfg.public_model} has no public router row; "
                             "run `flexmoe router-embed --model DIR --data PUBLIC_DATA --public` first")
    else:
        public_data = {split: out / "data" / "public" / split for split in ("train", "val")}
        if not all((p / "manifest.json").exists() for p in public_data.values()):
            corpora = build_builtin_corpora(out / "corpora", max_bytes_per_domain=cfg.max_bytes_per_domain,
                                            seed=cfg.seed)
            for split, p in public_data.items():
                if not (p / "manifest.json").exists():
                    prepare_data(corpora["public"][split], p, tok, domain="public", progress=False, overwrite=True)
        say(f"public model ({cfg.public_steps} steps on built-in public text, reused if present)", t0)
        public = train_public_model(out, public_data, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                    steps=cfg.public_steps, lr=cfg.public_lr, seed=cfg.seed, threads=cores,
                                    log=logs / "public.log")

    # 3. Per domain: router row from its own chats, branch; then both SFT variants from that anchor.
    from flexmoe.flex.branch import branch
    from flexmoe.flex.router_init import compute_router_embedding

    from safetensors.torch import load_file

    public_meta = json.loads((public / "flexmoe.json").read_text())
    public_file = (public_meta.get("router_embedding") or {}).get("router_public")
    public_profile = bool(public_file) and "domain_ngram" in load_file(str(public / public_file))
    anchors = {}
    for d in cfg.domains:
        od = out / "owners" / d
        anchors[d] = od / "anchor"
        if not (anchors[d] / "flexmoe.json").exists():
            rows = compute_router_embedding(public, text_data[d], od / "router.safetensors", seq_len=cfg.seq_len,
                                            num_windows=64, seed=cfg.seed)
            # The owner's n-gram profile of its own chats rides along, so the merges can route by
            # document (anchor_ngram) when the public model has a profile too.
            profile = load_file(str(od / "router.safetensors")).get("domain_ngram") if public_profile else None
            branch(public, anchors[d], rows, owner_ngram=profile, overwrite=True)

    def sft_run(job: tuple[str, str]) -> Path:
        d, variant = job
        run = out / "owners" / d / variant
        if not (run / "final" / "flexmoe.json").exists():
            run_step(flexmoe + ["train", f"out_dir={run}", f"stage={VARIANTS[variant]}", f"init_from={anchors[d]}",
                            "data.format=sft", f"+data.train.{d}={sft_data[d]['train']}",
                            f"+data.val.{d}={sft_data[d]['val']}", "stage.public_mix=0",
                            f"data.seq_len={cfg.seq_len}", f"data.batch_size={cfg.batch_size}",
                            f"trainer.steps={cfg.sft_steps}", f"optim.lr={cfg.sft_lr}",
                            f"optim.warmup_steps={max(cfg.sft_steps // 20, 1)}", f"trainer.seed={cfg.seed}",
                            f"trainer.threads={threads_each}", "trainer.log_every=20", "tokenizer=bytes",
                            f"meta.owner=owner-{d}", f"meta.domain={d}"],
                 logs / f"{d}-{variant}.log", threads_each)
        return run / "final"

    jobs_list = [(d, v) for d in cfg.domains for v in VARIANTS]
    say(f"training {len(jobs_list)} SFT experts ({cfg.sft_steps} steps each; {jobs} at a time): "
         + ", ".join(f"{d}/{v}" for d, v in jobs_list), t0)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        trained = dict(zip(jobs_list, pool.map(sft_run, jobs_list)))

    # 4. Packages and merges.
    from flexmoe.flex.merge import merge
    from flexmoe.flex.package import make_package

    pkgs: dict[str, list[Path]] = {v: [] for v in VARIANTS}
    for (d, v), final in trained.items():
        pkg = out / "owners" / d / f"package-{v}"
        if not (pkg / "manifest.json").exists():
            make_package(final, pkg, owner=f"owner-{d}", domain=d, licence="research", overwrite=True)
        pkgs[v].append(pkg)
    # routing=auto: document routing (anchor_ngram) when every package carries an n-gram profile;
    # the [topk] rows are the same merges under FlexOlmo's per-token top-k, for comparison.
    merges = {"merged/sft+shared=average": ("sft", "average", cfg.routing),
              "merged/sft+shared=public": ("sft", "public", cfg.routing),
              "merged/frozen": ("frozen", "public", cfg.routing),
              "merged/sft+shared=average[topk]": ("sft", "average", "topk"),
              "merged/frozen[topk]": ("frozen", "public", "topk")}
    merged_dirs = {}
    for name, (variant, shared, routing) in merges.items():
        if routing == "topk" and cfg.routing == "topk":
            continue
        m = out / "merged" / (f"{variant}-{shared}" + ("-topk" if name.endswith("[topk]") else ""))
        if not (m / "flexmoe.json").exists():
            merge(public, pkgs[variant], m, top_k=cfg.top_k, shared=shared, routing=routing, overwrite=True)
        merged_dirs[name] = m
    routing_used = json.loads((merged_dirs["merged/frozen"] / "config.json").read_text()).get("routing", "topk")
    say(f"merged (sft experts with shared=average and shared=public; frozen experts; routing={routing_used})", t0)

    # 5. Router tuning of the shared=average merge on a sample of each owner's chats.
    tuned = None
    if cfg.router_tune_steps > 0:
        proxy_args = []
        for d in cfg.domains:
            p = out / "data" / d / "proxy"
            if not (p / "manifest.json").exists():
                sample = sample_chats(chats[d]["train"], out / "chats" / d / "proxy.jsonl",
                                      cfg.router_tune_fraction, cfg.seed)
                prepare_sft([sample], p, tok, overwrite=True)
            proxy_args.append(f"+data.train.{d}={p}")
        run = out / "router_tune"
        if not (run / "final" / "flexmoe.json").exists():
            say(f"router tuning ({cfg.router_tune_steps} steps on {cfg.router_tune_fraction:.0%} of each "
                 "owner's chats)", t0)
            run_step(flexmoe + ["train", f"out_dir={run}", "stage=router_tune",
                            f"init_from={merged_dirs['merged/sft+shared=average']}", "data.format=sft", *proxy_args,
                            f"data.seq_len={cfg.seq_len}", f"data.batch_size={cfg.batch_size}",
                            f"trainer.steps={cfg.router_tune_steps}", f"optim.lr={cfg.router_tune_lr}",
                            f"optim.warmup_steps={max(cfg.router_tune_steps // 20, 1)}", f"trainer.seed={cfg.seed}",
                            f"trainer.threads={cores}", "trainer.log_every=10", "tokenizer=bytes"],
                 logs / "router_tune.log", cores)
        tuned = run / "final"

    # 6. Masked SFT validation loss of every model on every domain; the report.
    say("evaluating (masked SFT validation loss)", t0)
    models = {"public": public}
    for d in cfg.domains:
        for v in VARIANTS:
            models[f"expert-{v}/{d}"] = trained[(d, v)]
    models.update(merged_dirs)
    if tuned is not None:
        models["merged/sft+shared=average+router_tune"] = tuned
    loss = evaluate_models(models, {d: sft_data[d]["val"] for d in cfg.domains}, cfg.seq_len, cfg.eval_windows,
                           cfg.batch_size)
    report = {
        "recipe": "bar", "domains": list(cfg.domains), "val_loss": loss,
        "sft_beats_frozen": {d: loss[f"expert-sft/{d}"][d] < loss[f"expert-frozen/{d}"][d] for d in cfg.domains},
        "routing": routing_used,
        # the bound: the frozen merge beats the public model on every domain and is within
        # 1.10x of each frozen expert on its own domain
        "frozen_merge_bounds": {d: {"beats_public": loss["merged/frozen"][d] < loss["public"][d],
                                    "vs_expert": loss["merged/frozen"][d] / loss[f"expert-frozen/{d}"][d]}
                                for d in cfg.domains},
        "variants": {"sft": "stage=sft: embeddings + LM head + owner's expert train",
                     "frozen": "stage=midtrain: every shared tensor frozen, owner's expert trains"},
        "data": {d: {s: json.loads((sft_data[d][s] / "manifest.json").read_text())["num_examples"]
                     for s in ("train", "val")} for d in cfg.domains},
        "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(cfg), "cpu_count": cores,
    }
    if tuned is not None:
        means = {name: sum(loss[name][d] for d in cfg.domains) / len(cfg.domains)
                 for name in ("merged/sft+shared=average", "merged/sft+shared=average+router_tune")}
        report["router_tune_mean_val_loss"] = means
        report["router_tune_moved_only_routers"] = only_routers_moved(merged_dirs["merged/sft+shared=average"], tuned)
    write_bar_report(out, report)
    say(f"done: {out / 'bar_report.md'}", t0)
    return report


def evaluate_models(models: dict[str, Path], val_dirs: dict[str, Path], seq_len: int, num_windows: int,
                    batch_size: int) -> dict[str, dict[str, float]]:
    """{model: {domain: masked SFT validation loss}} over the first `num_windows` windows of each
    domain (the same windows for every model)."""
    from flexmoe.train.load import load_model
    from flexmoe.data.sft import SFTWindows
    from flexmoe.train.trainer import evaluate_loss

    windows = {d: SFTWindows(p, seq_len) for d, p in val_dirs.items()}
    batch = math.gcd(num_windows, batch_size) or 1  # batches that cover exactly num_windows windows
    result = {}
    for name, path in models.items():
        model, _, _ = load_model(path)
        result[name] = {d: evaluate_loss(model, w, num_windows // batch, batch) for d, w in windows.items()}
    return result


def only_routers_moved(before_dir: Path, after_dir: Path) -> bool:
    """True when every tensor but the router rows (and biases) is bit-identical between two models."""
    import torch

    from flexmoe.io.model_dir import load_model_dir

    _, a, _ = load_model_dir(before_dir)
    _, b, _ = load_model_dir(after_dir)
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a if not is_router_key(k))


def write_bar_report(out: Path, report: dict[str, Any]) -> None:
    """bar_report.json (everything) and bar_report.md (the loss table and the check), atomically."""
    from flexmoe.io.files import atomic_write_json, atomic_write_text

    domains = report["domains"]
    lines = ["# BAR quickstart: masked SFT validation loss (assistant tokens only; lower is better)", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in report["val_loss"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.4f}" for d in domains) + " |")
    lines += ["", "Variants: " + "; ".join(f"`{k}`: {v}" for k, v in report["variants"].items()) + ".", ""]
    for d in domains:
        sft, frozen = report["val_loss"][f"expert-sft/{d}"][d], report["val_loss"][f"expert-frozen/{d}"][d]
        verdict = "holds" if report["sft_beats_frozen"][d] else "does NOT hold"
        lines.append(f"- {d}: SFT expert with embeddings and head unfrozen {sft:.4f} vs all shared frozen "
                     f"{frozen:.4f}: the claim {verdict}.")
    if "router_tune_mean_val_loss" in report:
        m = report["router_tune_mean_val_loss"]
        lines.append(f"- router tuning, mean over expert domains: untuned {m['merged/sft+shared=average']:.4f}, "
                     f"tuned {m['merged/sft+shared=average+router_tune']:.4f}; experts and shared tensors "
                     f"bit-identical before and after: {report.get('router_tune_moved_only_routers')}.")
    lines.append(f"- the merges route with routing={report.get('routing')}; the `[topk]` rows are the same merges "
                 "under per-token top-k.")
    for d, b in (report.get("frozen_merge_bounds") or {}).items():
        ok = b["beats_public"] and b["vs_expert"] <= 1.10
        lines.append(f"- {d}: merged/frozen {'beats' if b['beats_public'] else 'does NOT beat'} the public model and is "
                     f"{b['vs_expert']:.3f}x the frozen expert (bound 1.10x): {'holds' if ok else 'does NOT hold'}.")
    c = report["config"]
    lines += ["", f"Settings: seq_len {c['seq_len']}, batch {c['batch_size']}, public {c['public_steps']} steps"
              f"{' (reused: ' + c['public_model'] + ')' if c['public_model'] else ''}, SFT {c['sft_steps']} steps "
              f"at lr {c['sft_lr']}, router tuning {c['router_tune_steps']} steps on {c['router_tune_fraction']:.0%}; "
              f"chats (train/val): " + ", ".join(f"{d} {v['train']}/{v['val']}" for d, v in report["data"].items())
              + f". Wall time {report['seconds']:.0f} s on {report['cpu_count']} CPU core(s).", ""]
    atomic_write_json(out / "bar_report.json", report)
    atomic_write_text(out / "bar_report.md", "\n".join(lines))
