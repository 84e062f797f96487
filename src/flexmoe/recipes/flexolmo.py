"""`flexmoe quickstart`: the whole FlexOlmo lifecycle on one machine, on text every machine has.

public model -> (per owner, in its own process, seeing only its own domain + public text)
router embedding -> branch -> expert training -> package -> merge -> evaluation -> report.

`recipe=bar` runs the post-training (BAR) version instead: see flexmoe.recipes.bar.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmoe.recipes.common import parse_overrides, run_step, say, train_public_model


@dataclass
class QuickstartConfig:
    recipe: str = "flexolmo"  # flexolmo: this module; bar: post-training (flexmoe.recipes.bar)
    out_dir: str = "quickstart-out"
    domains: list[str] = field(default_factory=lambda: ["code", "legal", "math"])
    max_bytes_per_domain: int = 1_200_000
    seq_len: int = 256
    batch_size: int = 16
    public_steps: int = 600
    public_lr: float = 3e-3
    expert_steps: int = 250
    expert_lr: float = 2e-3
    public_mix: float = 0.25
    top_k: int = 2
    # The merged model's routing policy (`flexmoe merge --routing`); auto picks anchor_ngram, the
    # measured best (README "Routing quality"). The report also shows the others.
    routing: str = "auto"
    eval_windows: int = 48
    jobs: int = 0  # parallel owner processes; 0: every owner at once, up to two per CPU core
    seed: int = 0
    # Owners that train under differential privacy (e.g. dp_owners=[math]): DP-SGD with document
    # units to dp_epsilon, a DP n-gram profile at dp_profile_epsilon; each is also trained without
    # DP, so the report can say what DP cost it (merged[no-dp] merges the non-DP packages).
    dp_owners: list[str] = field(default_factory=list)
    dp_epsilon: float = 8.0
    dp_profile_epsilon: float = 4.0
    dp_delta: float = 1e-5

    @classmethod
    def from_overrides(cls, argv: list[str]) -> "QuickstartConfig":
        """Parse `key=value` overrides (the same style as `flexmoe train`)."""
        return parse_overrides(cls, argv)



def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every lifecycle step and write report.md, report.json and routing_heatmap.png."""
    from flexmoe.data import ByteTokenizer, build_builtin_corpora, prepare_data

    if cfg.recipe != "flexolmo":
        raise ValueError(f"quickstart: recipe={cfg.recipe!r} runs through quickstart_main, not run_quickstart")

    t0 = time.perf_counter()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    flexmoe = [sys.executable, "-m", "flexmoe.cli"]
    cores = os.cpu_count() or 1
    # Every owner at once (up to two per core), one thread each: an owner's step is bound by the
    # MoE dispatch more than by matmuls, so a second thread hardly helps (measured: 4.2-4.7k
    # tokens/s at 2 threads vs 4.1-4.6k at 1), while 3 owners in 2 rounds on 2 cores left a core
    # idle for the whole second round.
    jobs = cfg.jobs or min(len(cfg.domains) + len(cfg.dp_owners), 2 * cores)
    threads_each = max(1, cores // jobs)

    # 1. Corpora and token shards (bytes as tokens: no tokenizer to train or download).
    say("[1/6] building corpora from this machine's own text (stdlib, licences, pydoc topics, arithmetic)", t0)
    corpora = build_builtin_corpora(out / "corpora", max_bytes_per_domain=cfg.max_bytes_per_domain, seed=cfg.seed)
    tok = ByteTokenizer()
    data: dict[str, dict[str, Path]] = {}
    for domain in ["public", *cfg.domains]:
        if domain not in corpora:
            raise ValueError(f"quickstart: domain {domain!r} is not built in; choose from {sorted(corpora)}")
        for split in ("train", "val"):
            d = out / "data" / domain / split
            if not (d / "manifest.json").exists():
                prepare_data(corpora[domain][split], d, tok, domain=domain, progress=False)
            data.setdefault(domain, {})[split] = d
    say("[2/6] token shards ready: " + ", ".join(f"{d}" for d in data), t0)

    # 2. The public model, pretrained on public text only.
    common = [f"data.seq_len={cfg.seq_len}", f"data.batch_size={cfg.batch_size}", "tokenizer=bytes",
              f"trainer.seed={cfg.seed}", "trainer.log_every=50"]
    if not (out / "public" / "final" / "flexmoe.json").exists():
        say(f"[3/6] training the public model ({cfg.public_steps} steps)", t0)
    public = train_public_model(out, data["public"], seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                steps=cfg.public_steps, lr=cfg.public_lr, seed=cfg.seed, threads=cores,
                                log=logs / "public.log")

    unknown = sorted(set(cfg.dp_owners) - set(cfg.domains))
    if unknown:
        raise ValueError(f"quickstart: dp_owners names {unknown}, which are not among domains={cfg.domains}")

    # 3. Each owner, alone: router row from its own data, branch, train, package.
    def owner(job: tuple[str, bool]) -> Path:
        domain, dp = job
        d = out / "owners" / (f"{domain}-dp" if dp else domain)
        d.mkdir(parents=True, exist_ok=True)
        log = logs / f"owner-{domain}{'-dp' if dp else ''}.log"
        pkg = d / "package"
        if (pkg / "manifest.json").exists():
            return pkg
        # Under DP the router rows start at zero and the n-gram profile is itself DP
        # (a noiseless statistic of the owner's data would void the guarantee).
        dp_embed = ["--dp-epsilon", str(cfg.dp_profile_epsilon)] if dp else []
        run_step(flexmoe + ["router-embed", "--model", str(public), "--data", str(data[domain]["train"]),
                        "--out", str(d / "router.safetensors"), "--seq-len", str(cfg.seq_len), *dp_embed],
                 log, threads_each)
        if not (d / "anchor" / "flexmoe.json").exists():
            run_step(flexmoe + ["branch", str(public), str(d / "anchor"), "--router-embedding",
                            str(d / "router.safetensors")], log, threads_each)
        say(f"      {domain}: router row and branch ready, training its expert{' under DP' if dp else ''} "
            f"(log: {log})", t0)
        # DP trains on the owner's documents only (public text would need no protection, but
        # DP-SGD samples one domain); the budget sets the noise (noise_multiplier=0: calibrated).
        mix = (["privacy.enabled=true", "privacy.unit=document", f"privacy.target_epsilon={cfg.dp_epsilon}",
                "privacy.noise_multiplier=0", f"privacy.delta={cfg.dp_delta}", "stage.public_mix=0"] if dp else
               [f"+data.train.public={data['public']['train']}", f"stage.public_mix={cfg.public_mix}"])
        run_step(flexmoe + ["train", f"out_dir={d / 'train'}", "stage=expert_anchor", f"init_from={d / 'anchor'}",
                        f"+data.train.{domain}={data[domain]['train']}", *mix,
                        f"+data.val.{domain}={data[domain]['val']}",
                        f"trainer.steps={cfg.expert_steps}", f"optim.lr={cfg.expert_lr}",
                        f"optim.warmup_steps={max(cfg.expert_steps // 20, 1)}", f"trainer.threads={threads_each}",
                        f"meta.owner=owner-{domain}", f"meta.domain={domain}", *common], log, threads_each)
        say(f"      {domain}: expert trained ({cfg.expert_steps} steps), packaging", t0)
        run_step(flexmoe + ["package", str(d / "train" / "final"), str(pkg), "--owner", f"owner-{domain}",
                        "--domain", domain, "--licence", "research", "--allowed-uses", "research"], log, threads_each)
        return pkg

    owner_jobs = [(d, False) for d in cfg.domains] + [(d, True) for d in cfg.dp_owners]
    say(f"[4/6] training {len(owner_jobs)} experts, {jobs} owner process(es) at a time, each on its own data", t0)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        built = dict(zip(owner_jobs, pool.map(owner, owner_jobs)))
    # The merge takes each DP owner's DP package; merged[no-dp] the non-DP ones, for comparison.
    packages = {d: built[(d, d in cfg.dp_owners)] for d in cfg.domains}

    # 4. Merge every package.
    merged = out / "merged"

    def merge(dst: Path, pkgs: dict[str, Path], log: str) -> None:
        if not (dst / "flexmoe.json").exists():
            run_step(flexmoe + ["merge", str(public), *map(str, pkgs.values()), "--out", str(dst),
                            "--top-k", str(cfg.top_k), "--routing", cfg.routing], logs / log, cores)

    merge(merged, packages, "merge.log")
    if cfg.dp_owners:
        merge(out / "merged-no-dp", {d: built[(d, False)] for d in cfg.domains}, "merge-no-dp.log")
    say("[5/6] merged; evaluating (the report runs every model on every domain)", t0)

    # 5. Evaluate and report.
    from flexmoe.recipes.report import evaluate_lifecycle, privacy_section, write_report

    owner_dir = {d: out / "owners" / (f"{d}-dp" if d in cfg.dp_owners else d) for d in cfg.domains}
    results = evaluate_lifecycle(public, merged, {d: owner_dir[d] / "train" / "final" for d in cfg.domains},
                                 {d: data[d]["val"] for d in ["public", *cfg.domains]}, cfg.seq_len,
                                 cfg.eval_windows)
    if cfg.dp_owners:
        results["privacy"] = privacy_section(out, public, cfg.dp_owners, {d: data[d]["val"] for d in cfg.domains},
                                             cfg.seq_len, cfg.eval_windows, results)
    results["seconds"] = time.perf_counter() - t0
    results["config"] = dataclasses.asdict(cfg)
    write_report(out, results, cfg.domains)
    say(f"[6/6] done: {out / 'report.md'}", t0)
    return results
