"""Attribution: which owners' experts carried a forward pass or a generation, and how much.

Per token and MoE layer, the `weight` share of expert e is its combine weight over the sum of the
token's combine weights (what mixes the experts' outputs; 1 per token), and its `token` share
counts the top-k assignments it received (also 1 per token and layer). Shares are reported per
layer, in total (the mean over layers) and summed per owner, from the router's own recorded
decision (`Routing`), so they hold for every routing policy and expert mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from flexmoe.model.moe import Routing


def token_weight_shares(routing: Routing, num_experts: int) -> torch.Tensor:
    """`[T, E]`: each token's combine weights scattered to expert slots, normalised to sum 1."""
    w_TE = torch.zeros(routing.top_w_TK.shape[0], num_experts, dtype=torch.float64)
    w_TE.scatter_add_(1, routing.top_idx_TK.long().cpu(), routing.top_w_TK.double().cpu())
    return w_TE / w_TE.sum(-1, keepdim=True).clamp_min(1e-300)


def token_assignment_shares(routing: Routing, num_experts: int) -> torch.Tensor:
    """`[T, E]`: each token's top-k assignments (with non-zero weight) per expert, over their count."""
    used = (routing.top_w_TK > 0).double().cpu()
    n_TE = torch.zeros(used.shape[0], num_experts, dtype=torch.float64)
    n_TE.scatter_add_(1, routing.top_idx_TK.long().cpu(), used)
    return n_TE / n_TE.sum(-1, keepdim=True).clamp_min(1)


def _names(experts: Sequence[dict[str, Any]] | None, num_experts: int) -> list[dict[str, Any]]:
    if experts and len(experts) == num_experts:
        return [{"slot": j, "owner": e.get("owner", f"slot{j}"), "domain": e.get("domain", f"slot{j}")}
                for j, e in enumerate(experts)]
    return [{"slot": j, "owner": f"slot{j}", "domain": f"slot{j}"} for j in range(num_experts)]


def attribution_from_routing(routings: Sequence[Routing], num_experts: int,
                             experts: Sequence[dict[str, Any]] | None = None,
                             positions_T: torch.Tensor | None = None) -> dict[str, Any]:
    """Attribution report from recorded routings (one per MoE layer); `positions_T` (bool or
    indices over the flattened tokens) restricts it to some tokens, e.g. the generated ones."""
    if not routings:
        raise ValueError("no routing recorded: attribution needs an MoE model (model.num_experts > 0)")
    layers = []
    for r in routings:
        w, n = token_weight_shares(r, num_experts), token_assignment_shares(r, num_experts)
        if positions_T is not None:
            w, n = w[positions_T], n[positions_T]
        layers.append({"weight": w.mean(0).tolist(), "tokens": n.mean(0).tolist()})
    total_w = np.mean([lay["weight"] for lay in layers], axis=0)
    total_n = np.mean([lay["tokens"] for lay in layers], axis=0)
    names = _names(experts, num_experts)
    owners: dict[str, dict[str, float]] = {}
    for e, tw, tn in zip(names, total_w, total_n):
        o = owners.setdefault(e["owner"], {"weight": 0.0, "tokens": 0.0})
        o["weight"] += float(tw)
        o["tokens"] += float(tn)
    num_tokens = int(w.shape[0])
    return {"num_tokens": num_tokens, "num_layers": len(layers),
            "experts": [dict(e, weight=float(tw), tokens=float(tn)) for e, tw, tn in zip(names, total_w, total_n)],
            "owners": owners, "layers": layers}


@torch.no_grad()
def attribution(model, tokens_BS: torch.Tensor, experts: Sequence[dict[str, Any]] | None = None, *,
                expert_mask: torch.Tensor | None = None, positions: slice | None = None) -> dict[str, Any]:
    """Share of routing weight and of tokens each expert (and owner) received on `tokens_BS`,
    per layer and in total. `positions` (a slice over the sequence) keeps only those positions,
    e.g. `slice(P - 1, -1)` for the positions that produced the tokens generated after a
    P-token prompt. `experts`: the merged model's flexmoe.json `experts` list (names the slots)."""
    was = model.training
    model.eval()
    model.set_record_routing(True)
    try:
        out = model(tokens_BS, expert_mask)
    finally:
        model.set_record_routing(False)
        model.train(was)
    sel = None
    if positions is not None:
        B, S = tokens_BS.shape
        keep_S = torch.zeros(S, dtype=torch.bool)
        keep_S[positions] = True
        sel = keep_S.repeat(B)
    return attribution_from_routing(out.routing, model.cfg.num_experts, experts, sel)


@torch.no_grad()
def attribution_windows(model, windows, experts: Sequence[dict[str, Any]] | None = None, *, num_windows: int = 32,
                        batch_size: int = 8, expert_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Attribution over the first `num_windows` windows of a TokenWindows set (an eval domain):
    the eval report calls this once per domain. Shares are token-weighted over all windows."""
    n = min(len(windows), num_windows)
    parts = []
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(np.stack([windows[i] for i in range(start, min(start + batch_size, n))]))
        parts.append(attribution(model, batch[:, :-1], experts, expert_mask=expert_mask))
    return merge_attributions(parts)


def merge_attributions(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted mean of several attribution reports over the same model."""
    total = sum(p["num_tokens"] for p in parts)
    if total == 0:
        raise ValueError("no tokens to attribute")
    wmean = lambda get: np.sum([np.asarray(get(p)) * p["num_tokens"] for p in parts], axis=0) / total  # noqa: E731
    first = parts[0]
    out = {"num_tokens": total, "num_layers": first["num_layers"],
           "experts": [dict(e, weight=float(wmean(lambda p: p["experts"][j]["weight"])),
                            tokens=float(wmean(lambda p: p["experts"][j]["tokens"])))
                       for j, e in enumerate(first["experts"])],
           "layers": [{"weight": wmean(lambda p: p["layers"][i]["weight"]).tolist(),
                       "tokens": wmean(lambda p: p["layers"][i]["tokens"]).tolist()}
                      for i in range(first["num_layers"])]}
    out["owners"] = {}
    for e in out["experts"]:
        o = out["owners"].setdefault(e["owner"], {"weight": 0.0, "tokens": 0.0})
        o["weight"] += e["weight"]
        o["tokens"] += e["tokens"]
    return out


def format_attribution(report: dict[str, Any], per_layer: bool = False) -> str:
    """A plain-text table: one row per expert slot (and per layer with `per_layer`)."""
    lines = [f"attribution over {report['num_tokens']} token(s), {report['num_layers']} MoE layer(s)",
             f"{'slot':>4}  {'owner':<20} {'domain':<16} {'weight':>7} {'tokens':>7}"]
    for e in report["experts"]:
        lines.append(f"{e['slot']:>4}  {e['owner']:<20} {e['domain']:<16} {e['weight']:>7.1%} {e['tokens']:>7.1%}")
    if per_layer:
        for i, lay in enumerate(report["layers"]):
            cells = "  ".join(f"{w:.1%}" for w in lay["weight"])
            lines.append(f"layer {i}: weight {cells}")
    return "\n".join(lines)
