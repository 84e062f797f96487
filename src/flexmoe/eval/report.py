"""The lifecycle report: perplexity per eval domain for the public model, each owner's expert,
the merged model, the merged model with each expert opted out, the soup and a BTM ensemble."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexmoe.convert.safetensors_io import load_model
from flexmoe.eval.baselines import ensemble_logprobs, soup_model
from flexmoe.eval.perplexity import model_logprobs, perplexity
from flexmoe.eval.routing import plot_heatmap, routing_shares
from flexmoe.flex.optout import expert_mask


def evaluate_lifecycle(public_dir: Path, merged_dir: Path, expert_dirs: dict[str, Path],
                       val_dirs: dict[str, Path], seq_len: int, num_windows: int) -> dict[str, Any]:
    """Every report row on every eval domain; plus routing shares of the merged model."""
    from flexmoe.data import TokenWindows

    windows = {d: TokenWindows(p, seq_len) for d, p in val_dirs.items()}

    def row(fn) -> dict[str, float]:
        return {d: perplexity(fn, w, num_windows) for d, w in windows.items()}

    ppl: dict[str, dict[str, float]] = {}
    public, _, _ = load_model(public_dir)
    ppl["public"] = row(model_logprobs(public.eval()))
    experts = {}
    for d, path in expert_dirs.items():
        experts[d], _, _ = load_model(path)
        ppl[f"expert/{d}"] = row(model_logprobs(experts[d].eval()))
    merged, mcfg, meta = load_model(merged_dir)
    merged.eval()
    ppl["merged"] = row(model_logprobs(merged))
    for d in expert_dirs:
        ppl[f"merged-without/{d}"] = row(model_logprobs(merged, expert_mask(meta["experts"], [d])))
    # The same merged weights under the other routing policies (a setting, not a retrain).
    for policy in ("topk", "anchor_top1", "anchor_doc"):
        if policy != mcfg.routing:
            alt = type(merged)(mcfg.replace(routing=policy))
            alt.load_state_dict(merged.state_dict())
            ppl[f"merged[routing={policy}]"] = row(model_logprobs(alt.eval()))
    ppl["soup"] = row(model_logprobs(soup_model(merged)))
    ppl["btm-ensemble"] = row(ensemble_logprobs([m.eval() for m in experts.values()]))
    shares = {d: routing_shares(merged, w, num_windows=min(num_windows, 16)) for d, w in windows.items()}
    return {
        "eval_domains": list(windows), "perplexity": ppl,
        "routing_shares": {d: s.tolist() for d, s in shares.items()},
        "experts": [e["domain"] for e in meta["experts"]], "top_k": mcfg.top_k,
    }


def check_claims(ppl: dict[str, dict[str, float]], domains: list[str]) -> list[tuple[str, bool]]:
    """Issue 2's acceptance claims, evaluated on the numbers (never assumed)."""
    claims = []
    for d in domains:
        claims.append((f"merged[{d}] < public[{d}]", ppl["merged"][d] < ppl["public"][d]))
        claims.append((f"merged-without/{d}[{d}] > merged[{d}]", ppl[f"merged-without/{d}"][d] > ppl["merged"][d]))
    mean = lambda r: float(np.mean([ppl[r][d] for d in domains]))  # noqa: E731
    claims.append((f"mean merged {mean('merged'):.3f} < mean soup {mean('soup'):.3f} over expert domains",
                   mean("merged") < mean("soup")))
    return claims


def write_report(out: Path, results: dict[str, Any], domains: list[str]) -> None:
    """report.json (machine-readable), report.md (table, claims, heatmap) and routing_heatmap.png."""
    ppl, evald = results["perplexity"], results["eval_domains"]
    heat = plot_heatmap({d: np.array(s) for d, s in results["routing_shares"].items()}, results["experts"],
                        out / "routing_heatmap.png", f"merged model: share of tokens per expert (top-{results['top_k']})")
    claims = check_claims(ppl, domains)
    results["claims"] = {c: ok for c, ok in claims}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "report.json")
    lines = ["# flexmoe quickstart report", "",
             f"Perplexity per eval domain (lower is better); {results['seconds']:.0f} s on "
             f"{torch.get_num_threads()} thread(s).", "",
             "| model | " + " | ".join(evald) + " |", "|---|" + "---|" * len(evald)]
    for name, r in ppl.items():
        best = {d: min(ppl[m][d] for m in ppl) for d in evald}
        cells = [f"**{r[d]:.3f}**" if r[d] == best[d] else f"{r[d]:.3f}" for d in evald]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Rows: `public` the dense public model; `expert/<d>` owner d's 2-expert model (public + own "
              "expert); `merged` all experts; `merged-without/<d>` the merged model with d opted out at inference; "
              "`soup` the experts' FFNs averaged into one dense model; `btm-ensemble` the owners' models' output "
              "distributions averaged; `merged[routing=...]` the same merged weights under another routing policy "
              "(see `model.routing`).", "", "## Claims checked on these numbers", ""]
    lines += [f"- [{'x' if ok else ' '}] {c}" for c, ok in claims]
    lines += ["", "## Routing", "", f"![routing heatmap]({heat.name})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
