"""The lifecycle report: perplexity per eval domain for the public model, each owner's expert,
the merged model, the merged model with each expert opted out, the soup and a BTM ensemble."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexmoe.config.model import ROUTINGS
from flexmoe.train.load import load_model
from flexmoe.eval.baselines import ensemble_logprobs, soup_model
from flexmoe.train.perplexity import model_logprobs, perplexity
from flexmoe.eval.routing import plot_heatmap, routing_shares
from flexmoe.flex.attribution import attribution_windows
from flexmoe.flex.optout import expert_mask
from flexmoe.io.files import atomic_write_text


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
    for policy in ROUTINGS:
        if policy == "anchor_ngram" and not mcfg.doc_ngram_buckets:
            continue  # merged from packages without n-gram profiles
        if policy != mcfg.routing:
            alt = type(merged)(mcfg.replace(routing=policy))
            alt.load_state_dict(merged.state_dict())
            ppl[f"merged[routing={policy}]"] = row(model_logprobs(alt.eval()))
    release = hf_release_logprobs(merged_dir)
    if release is not None:  # the export-hf release, run by transformers (trust_remote_code for anchor_*)
        ppl["merged[hf-release]"] = row(release)
    ppl["soup"] = row(model_logprobs(soup_model(merged)))
    ppl["btm-ensemble"] = row(ensemble_logprobs([m.eval() for m in experts.values()]))
    shares = {d: routing_shares(merged, w, num_windows=min(num_windows, 16)) for d, w in windows.items()}
    # Who is credited for each eval domain: each owner's share of the merged model's routing weight.
    credit = {d: attribution_windows(merged, w, meta["experts"], num_windows=min(num_windows, 16))["owners"]
              for d, w in windows.items()}
    return {
        "attribution": {d: {o: v["weight"] for o, v in c.items()} for d, c in credit.items()},
        "eval_domains": list(windows), "perplexity": ppl,
        "routing_shares": {d: s.tolist() for d, s in shares.items()},
        "experts": [e["domain"] for e in meta["experts"]], "top_k": mcfg.top_k, "routing": mcfg.routing,
    }


def privacy_section(out: Path, public_dir: Path, dp_owners: list[str], val_dirs: dict[str, Path], seq_len: int,
                    num_windows: int, results: dict[str, Any]) -> dict[str, Any]:
    """Per DP owner: its guarantee (from its package), and what DP cost it on its own domain, DP
    against the same owner trained without DP: the expert alone, the merged model (merged against
    merged-no-dp, which merges the non-DP packages), and the share of its domain's tokens routed
    to its expert."""
    from flexmoe.data import TokenWindows

    section: dict[str, Any] = {}
    nodp, _, nodp_meta = load_model(out / "merged-no-dp")
    merged, _, meta = load_model(out / "merged")
    for d in dp_owners:
        manifest = json.loads((out / "owners" / f"{d}-dp" / "package" / "manifest.json").read_text())
        w = TokenWindows(val_dirs[d], seq_len)
        expert_nodp, _, _ = load_model(out / "owners" / d / "train" / "final")
        slot = next(e["slot"] for e in meta["experts"] if e["domain"] == d)
        slot_nodp = next(e["slot"] for e in nodp_meta["experts"] if e["domain"] == d)
        n = min(num_windows, 16)
        section[d] = {
            "dp": manifest.get("dp"), "profile_dp": manifest.get("profile_dp"),
            "privacy_total": manifest.get("privacy_total"),
            "expert_ppl": {"dp": results["perplexity"][f"expert/{d}"][d],
                           "no_dp": perplexity(model_logprobs(expert_nodp.eval()), w, num_windows)},
            "merged_ppl": {"dp": results["perplexity"]["merged"][d],
                           "no_dp": perplexity(model_logprobs(nodp.eval()), w, num_windows)},
            "routed_to_own_expert": {"dp": float(routing_shares(merged.eval(), w, num_windows=n)[slot]),
                                     "no_dp": float(routing_shares(nodp, w, num_windows=n)[slot_nodp])},
        }
    return section


def privacy_lines(section: dict[str, Any]) -> list[str]:
    """report.md's differential-privacy section."""
    lines = ["", "## Differential privacy", "",
             "Owners trained under DP-SGD (document units) with a DP n-gram profile, each against the same owner "
             "trained without DP; `merged` takes the DP package, `merged-no-dp` the non-DP one. Perplexity on the "
             "owner's own domain; routed: the share of its domain's tokens sent to its expert.", "",
             "| owner | training epsilon (delta) | profile epsilon | total epsilon | expert ppl DP / no DP | "
             "merged ppl DP / no DP | routed DP / no DP |", "|---|---|---|---|---|---|---|"]
    for d, r in section.items():
        dp, prof, tot = r["dp"] or {}, r["profile_dp"] or {}, r["privacy_total"] or {}
        lines.append(f"| {d} | {dp.get('epsilon', float('nan')):.2f} ({dp.get('delta', 0):g}) | "
                     f"{prof.get('epsilon', float('nan')):.2f} | {tot.get('epsilon', float('nan')):.2f} | "
                     f"{r['expert_ppl']['dp']:.3f} / {r['expert_ppl']['no_dp']:.3f} | "
                     f"{r['merged_ppl']['dp']:.3f} / {r['merged_ppl']['no_dp']:.3f} | "
                     f"{r['routed_to_own_expert']['dp']:.2f} / {r['routed_to_own_expert']['no_dp']:.2f} |")
    return lines


def hf_release_logprobs(merged_dir: Path):
    """Log-probs of `flexmoe export-hf merged_dir` loaded by transformers; None without transformers
    or when the merge has no Hugging Face release (e.g. routing=anchor_doc)."""
    import tempfile

    from flexmoe.convert.hf_export import export_hf
    from flexmoe.io.model_dir import CheckpointError

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            release = export_hf(merged_dir, Path(tmp) / "hf", verify=False)
        except CheckpointError:
            return None
        model = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True).eval()
    return lambda tokens: torch.log_softmax(model(tokens, use_cache=False).logits.float(), dim=-1)


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


# The routing-quality bounds the default recipe is held to (README "Routing quality").
EXPERT_RATIO_MAX = 1.10  # merged[d] <= 1.10 x expert/d[d]
OPT_OUT_DRIFT_MAX = 0.03  # opting d out moves merged[e] by at most 3% for every other domain e
PUBLIC_RATIO_MAX = 1.05  # merged <= 1.05 x public on public text
SOUP_GAIN_MIN = 0.10  # mean merged at least 10% below mean soup over expert domains


def routing_quality(ppl: dict[str, dict[str, float]], domains: list[str],
                    public_domain: str = "public") -> dict[str, Any]:
    """The routing-quality numbers of the `merged` row: merged/expert ratio per expert domain, the
    largest opt-out drift (`merged-without/<d>`) on each other domain, merged/public on public
    text, merged vs soup."""
    m = ppl["merged"]
    ratio = {d: m[d] / ppl[f"expert/{d}"][d] for d in domains}
    drift = {}
    for d in domains:
        row = ppl[f"merged-without/{d}"]
        drift[d] = max((abs(row[e] / m[e] - 1) for e in m if e != d), default=0.0)
    mean = lambda r: float(np.mean([r[d] for d in domains]))  # noqa: E731
    out = {"expert_ratio": ratio, "opt_out_drift": drift, "soup_gain": 1 - mean(m) / mean(ppl["soup"])}
    if public_domain in m:
        out["public_ratio"] = m[public_domain] / ppl["public"][public_domain]
    return out


def quality_claims(q: dict[str, Any]) -> list[tuple[str, bool]]:
    """The routing-quality bounds as (claim, holds) pairs."""
    claims = [(f"merged[{d}] / expert/{d}[{d}] = {r:.3f} <= {EXPERT_RATIO_MAX}", r <= EXPERT_RATIO_MAX)
              for d, r in q["expert_ratio"].items()]
    claims += [(f"opting {d} out moves other domains by at most {v:.1%} <= {OPT_OUT_DRIFT_MAX:.0%}",
                v <= OPT_OUT_DRIFT_MAX) for d, v in q["opt_out_drift"].items()]
    if "public_ratio" in q:
        claims.append((f"merged / public on public text = {q['public_ratio']:.3f} <= {PUBLIC_RATIO_MAX}",
                       q["public_ratio"] <= PUBLIC_RATIO_MAX))
    claims.append((f"mean merged is {q['soup_gain']:.1%} below mean soup (>= {SOUP_GAIN_MIN:.0%})",
                   q["soup_gain"] >= SOUP_GAIN_MIN))
    return claims


def write_report(out: Path, results: dict[str, Any], domains: list[str]) -> None:
    """report.json (machine-readable), report.md (table, claims, heatmap) and routing_heatmap.png."""
    ppl, evald = results["perplexity"], results["eval_domains"]
    heat = plot_heatmap({d: np.array(s) for d, s in results["routing_shares"].items()}, results["experts"],
                        out / "routing_heatmap.png", f"merged model: share of tokens per expert (top-{results['top_k']})")
    claims = check_claims(ppl, domains)
    results["claims"] = {c: ok for c, ok in claims}
    quality = routing_quality(ppl, domains)
    results["routing_quality"] = quality
    results["routing_quality_claims"] = {c: ok for c, ok in quality_claims(quality)}
    atomic_write_text(out / "report.json", json.dumps(results, indent=1) + "\n")
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
              "(see `model.routing`); `merged[hf-release]` the `flexmoe export-hf` release of `merged` run by "
              "transformers.", "", "## Claims checked on these numbers", ""]
    lines += [f"- [{'x' if ok else ' '}] {c}" for c, ok in claims]
    lines += ["", f"## Routing quality of `merged` (routing={results.get('routing', 'topk')})", ""]
    lines += [f"- [{'x' if ok else ' '}] {c}" for c, ok in results["routing_quality_claims"].items()]
    if results.get("attribution"):
        owners = list(next(iter(results["attribution"].values())))
        lines += ["", "## Attribution", "", "Each owner's share of the merged model's routing weight on each eval "
                  "domain (all MoE layers; rows sum to 1; `flexmoe generate --attribution` gives the same per output).",
                  "", "| eval domain | " + " | ".join(owners) + " |", "|---|" + "---|" * len(owners)]
        for d, row in results["attribution"].items():
            lines.append(f"| {d} | " + " | ".join(f"{row[o]:.3f}" for o in owners) + " |")
    if results.get("privacy"):
        lines += privacy_lines(results["privacy"])
    lines += ["", "## Routing", "", f"![routing heatmap]({heat.name})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
