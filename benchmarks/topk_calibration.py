"""Top-k calibration ablation (issue 19 item 2): which router rows / biases make per-token top-k
imitate the document router of an `anchor_ngram` merge, and what does each lever give?

Reads a finished quickstart run (public/, owners/, merged/, data/, report.json) and never writes
into it. Every variant refits only router tensors of the merged model (recipes/calibrate.py) and is
evaluated under routing=topk on the run's validation windows, against the experts' perplexities
in report.json:

    python benchmarks/topk_calibration.py --run /tmp/q-new [--variants a,b] [--windows 48]

Columns: merged/expert per domain, merged/uncalibrated-top-k per domain (the "never worse by
more than 2%" bound), the worst opt-out drift on another domain, and the share of validation
tokens on which top-k picks the document router's experts (all layers). Rows marked (pooled) fit
on owners' own data in one place, which a default may not do; `owner/...` rows are fitted by each
owner alone on its own trained model (owners/DOMAIN/train/final), own data and public windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexmoe.recipes import calibrate as cal  # noqa: E402

# name -> (mode, data sources, steps, target); data: P public train windows, G owner-generated,
# O owners' train data; target: doc = the document router's weights everywhere, pair = text from
# owner j (generated or its own) routed to the anchor + j (public text: the document router's)
VARIANTS = {
    "rows/P": ("rows", "P", 300, "doc"),
    "rows/G": ("rows", "G", 300, "doc"),
    "rows/P+G": ("rows", "PG", 300, "doc"),
    "rows/P+G pair": ("rows", "PG", 300, "pair"),
    "bias/P+G": ("bias", "PG", 300, "doc"),
    "rows+bias/P+G": ("rows+bias", "PG", 300, "doc"),
    "rows/P+O (pooled)": ("rows", "PO", 300, "doc"),
    "rows/P+O pair (pooled)": ("rows", "PO", 300, "pair"),
    "rows/P+G+O (pooled)": ("rows", "PGO", 300, "doc"),
    "rows/P+G steps=30": ("rows", "PG", 30, "doc"),
    "rows/P+O steps=30 (pooled)": ("rows", "PO", 30, "doc"),
    # tokens the document router gives to the anchor alone weighed 0.1 / 0 in the fit
    "rows/P+G pair a0=0.1": ("rows", "PG", 300, "pair", 0.1),
    "rows/P+G pair a0=0": ("rows", "PG", 300, "pair", 0.0),
    "rows/P+O a0=0.1 (pooled)": ("rows", "PO", 300, "doc", 0.1),
    # owner-fitted (recipes/owner_router.py, `package --fit-router`): each owner alone fits its own
    # row against the public row on its 2-expert model, on its own data + public windows; not pooled
    "owner/P+O pair a0=0.1": ("owner", "PO", 300, "pair", 0.1),
    "owner/P+O doc a0=0.1": ("owner", "PO", 300, "doc", 0.1),
    "owner/P+O pair a0=1": ("owner", "PO", 300, "pair", 1.0),
    "owner/P+O pair a0=0": ("owner", "PO", 300, "pair", 0.0),
    # target own: own-data tokens -> 0.9 on the own expert, 0.1 on the anchor
    "owner/P+O own0.9 a0=0.1": ("owner", "PO", 300, "own", 0.1),
    "owner/P+O own0.9 a0=1": ("owner", "PO", 300, "own", 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `flexmoe quickstart` output directory")
    ap.add_argument("--variants", default="", help=f"comma-separated among: {', '.join(VARIANTS)}")
    ap.add_argument("--windows", type=int, default=48, help="validation windows per domain (the report's 48)")
    ap.add_argument("--public-windows", type=int, default=96)
    ap.add_argument("--generated", type=int, default=32, help="generated sequences per owner")
    ap.add_argument("--own-windows", type=int, default=32, help="own-data windows per owner (pooled rows)")
    ap.add_argument("--owner-public-windows", type=int, default=32, help="public windows each owner fits on (owner rows)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--evaluate", default="", metavar="DIR[,DIR]",
                    help="also evaluate these merged directories as rows (e.g. a `merge --calibrate owner` output)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of owner text")
    ap.add_argument("--cache", help="keep the calibration text in this .pt file (generation is the slow part)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = [v for v in a.variants.split(",") if v] or ([] if a.evaluate else list(VARIANTS))
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}")
    from flexmoe.data import TokenWindows
    from flexmoe.train.load import load_model
    from flexmoe.train.perplexity import model_logprobs, perplexity

    run = Path(a.run)
    report = json.loads((run / "report.json").read_text())
    domains = report["config"]["domains"]
    expert_ppl = {d: report["perplexity"][f"expert/{d}"][d] for d in domains}
    merged, mcfg, meta = load_model(run / "merged")
    merged.eval()
    slots = {e["domain"]: e["slot"] for e in meta["experts"]}
    val = {d: TokenWindows(run / "data" / d / "val", a.seq_len) for d in ["public", *domains]}
    t0 = time.perf_counter()

    # Calibration text
    topk0 = cal.with_routing(merged, "topk")
    texts = {"P": cal.public_text(TokenWindows(run / "data" / "public" / "train", a.seq_len), a.public_windows, a.seq_len)}
    if not any("G" in VARIANTS[v][1] for v in names):  # generation is the slow part: only when a variant uses it
        gen = [torch.zeros(0, a.seq_len, dtype=torch.long) for _ in domains]
    elif a.cache and Path(a.cache).exists():
        gen = list(torch.load(a.cache))
    else:
        gen = [cal.owner_text(topk0, slots[d], a.generated, a.seq_len, temperature=a.temperature) for d in domains]
        if a.cache:
            torch.save(torch.stack(gen), a.cache)
    texts["G"] = torch.cat(gen)
    own = [cal.public_text(TokenWindows(run / "data" / d / "train", a.seq_len), a.own_windows, a.seq_len) for d in domains]
    texts["O"] = torch.cat(own)
    # the owner each sequence comes from (0: public text), for the pair targets
    owner_of = {"P": torch.zeros(len(texts["P"]), dtype=torch.long),
                "G": torch.cat([torch.full((len(g),), slots[d]) for d, g in zip(domains, gen)]),
                "O": torch.cat([torch.full((len(o),), slots[d]) for d, o in zip(domains, own)])}
    print(f"calibration text: {', '.join(f'{k} {tuple(v.shape)}' for k, v in texts.items())} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # what the generated text looks like to the document router
    from flexmoe.model.docroute import ngram_choice
    for d, g in zip(domains, gen):
        if not len(g):
            continue
        ch = ngram_choice(g, merged.domain_ngrams)
        share = torch.bincount(ch.reshape(-1), minlength=mcfg.num_experts).float() / ch.numel()
        print(f"  generated by owner {d}: document router's choice shares {[round(float(x), 3) for x in share]}")

    # validation targets for agreement
    val_tokens = {d: torch.stack([torch.from_numpy(w[i][:-1]) for i in range(min(len(w), a.windows))]).long()
                  for d, w in val.items()}
    val_targets = {d: cal.document_targets(merged, t) for d, t in val_tokens.items()}

    def evaluate(name: str, model) -> dict:
        r = {"variant": name}
        ppl = {d: perplexity(model_logprobs(model), w, a.windows) for d, w in val.items()}
        drift = 0.0
        for d in domains:
            mask = torch.ones(mcfg.num_experts, dtype=torch.bool)
            mask[slots[d]] = False
            for e in val:
                if e != d:
                    drift = max(drift, abs(perplexity(model_logprobs(model, mask), val[e], a.windows) / ppl[e] - 1))
        agree = []
        model.set_record_routing(True)
        with torch.no_grad():
            for d, t in val_tokens.items():
                out = model(t, last_hidden_only=True)
                for i, rt in enumerate(out.routing):
                    logits = model.layers[i].ffn.router.logits(
                        model(t, capture_hidden=True, last_hidden_only=True).hidden_states[i].reshape(-1, mcfg.d_model))
                    agree.append(cal.agreement(logits, val_targets[d][i]).float().mean())
        model.set_record_routing(False)
        r["ppl"] = ppl
        r["ratio"] = {d: ppl[d] / expert_ppl[d] for d in domains}
        r["drift"] = drift
        r["agreement"] = float(torch.stack(agree).mean())
        return r

    rows = []
    base = evaluate("uncalibrated topk", topk0)
    rows.append(base)
    show(base, base, domains)
    for extra in [d for d in a.evaluate.split(",") if d]:
        m, _, _ = load_model(extra)
        rows.append(evaluate(f"merged dir {extra}", m.eval()))
        show(rows[-1], base, domains)
    for name in names:
        mode, data, steps, target, *a0 = VARIANTS[name]
        t1 = time.perf_counter()
        if mode == "owner":  # each owner alone: its trained 2-expert model, its own windows, public windows
            from flexmoe.recipes.owner_router import fit_owner_rows

            rows_by_slot, ntok = {}, 0
            for d, o in zip(domains, own):
                model2, _, _ = load_model(run / "owners" / d / "train" / "final")
                rows_by_slot[slots[d]] = fit_owner_rows(model2.eval(), o, texts["P"][:a.owner_public_windows],
                                                        target=target, anchor_only_weight=a0[0], steps=steps)
                ntok += o.numel() + texts["P"][:a.owner_public_windows].numel()
            model = cal.with_routing(merged, "topk")
            sd = model.state_dict()
            for i in range(mcfg.num_layers):
                key = cal.router_weight_key(i)
                sd[key] = torch.stack([sd[key][0]] + [rows_by_slot[j][i] for j in range(1, mcfg.num_experts)])
            model.load_state_dict(sd)
            r = evaluate(name, model.eval())
            r["fit_seconds"] = time.perf_counter() - t1
            r["tokens"] = int(ntok)
            rows.append(r)
            show(r, base, domains)
            continue
        tokens = torch.cat([texts[k] for k in data])
        choice = None
        if target == "pair":
            from flexmoe.model.docroute import ngram_choice

            who = torch.cat([owner_of[k] for k in data])
            choice = torch.where(who[:, None] > 0, who[:, None].expand_as(tokens), ngram_choice(tokens, merged.domain_ngrams))
        tensors = cal.calibrate_model(merged, tokens, mode=mode, steps=steps, log=print, choice_NS=choice,
                                      anchor_only_weight=a0[0] if a0 else 1.0)
        fit_s = time.perf_counter() - t1
        model = cal.with_routing(merged, "topk", bias=True if mode != "rows" else None)
        sd = model.state_dict()
        sd.update(tensors)
        model.load_state_dict(sd)
        r = evaluate(name, model.eval())
        r["fit_seconds"] = fit_s
        r["tokens"] = int(tokens.numel())
        rows.append(r)
        show(r, base, domains)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print("\n| variant | " + " | ".join(f"{d} m/e" for d in domains) + " | worst vs uncal. | drift | agreement | fit s |")
    print("|---|" + "---|" * (len(domains) + 4))
    for r in rows:
        worst = max(r["ppl"][d] / base["ppl"][d] for d in r["ppl"])
        print(f"| {r['variant']} | " + " | ".join(f"{r['ratio'][d]:.3f}" for d in domains) +
              f" | {worst:.3f} | {r['drift']:.1%} | {r['agreement']:.1%} | {r.get('fit_seconds', 0):.0f} |")


def show(r: dict, base: dict, domains: list[str]) -> None:
    worst = max(r["ppl"][d] / base["ppl"][d] for d in r["ppl"])
    print(f"{r['variant']:26} " + " ".join(f"{d} {r['ratio'][d]:.3f}" for d in domains) +
          f"  public ppl {r['ppl']['public']:.3f}  worst-vs-uncal {worst:.3f}  drift {r['drift']:.1%}  "
          f"agree {r['agreement']:.1%}", flush=True)


if __name__ == "__main__":
    main()
