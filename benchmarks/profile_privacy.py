"""What differential privacy costs an n-gram profile, and what it buys (issue 17, item 5).

On the quickstart's built-in corpora (public, code, legal, math; byte tokens, 32,768 buckets):

- routing: each owner's profile from its train split, exact or DP (`router-embed --dp-epsilon`,
  data/private_ngrams.py), the public profile exact; the share of held-out windows (the val
  split, 256 tokens) of each domain whose document-routing choice after the whole window picks
  the right slot (public windows: the anchor), and the share of all positions routed right
  (each position by its prefix, as `routing=anchor_ngram` routes);
- membership inference: each owner's train documents split at random in halves, members and
  non-members; the profile is made from the members only; every document is scored by its mean
  n-gram log-likelihood ratio against a reference profile of similar text (the owner domain's
  val split, which is neither); AUC of members vs non-members (0.5: guessing).

DP rows add Laplace noise of scale cap_total / epsilon per bucket to counts clipped per unit
(a document, or a 256-token window); `clipped` is the clipping alone (no noise, no guarantee).
DP numbers are means over --seeds noise draws; AUCs are means over --splits member/non-member splits
(one split strays from 0.5 by its documents' own traits even when the profile says nothing).

    python benchmarks/profile_privacy.py --work /tmp/profile-privacy [--max-bytes 1500000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexmoe.data import ByteTokenizer, TokenWindows, build_builtin_corpora, prepare_data  # noqa: E402
from flexmoe.data.ngrams import ngram_profile  # noqa: E402
from flexmoe.data.private_ngrams import (DEFAULT_CAP_BUCKET, DEFAULT_CAP_TOTAL, directory_counts,  # noqa: E402
                                         noise_scale, noisy_counts, profile_from_noisy)
from flexmoe.eval.profile_attack import auc, membership_scores, routing_accuracy  # noqa: E402
from flexmoe.train.hardware import cpu_name  # noqa: E402

OWNERS = ("code", "legal", "math")
WINDOW = 256


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prepare(docs: list[str], out: Path, name: str) -> Path:
    src = out.with_suffix(".jsonl")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare_data([src], out, ByteTokenizer(), domain=name, progress=False, overwrite=True)
    return out


def _held_out_windows(val_dir: Path, n: int) -> np.ndarray:
    w = TokenWindows(val_dir, WINDOW)
    idx = np.unique(np.linspace(0, len(w) - 1, min(n, len(w))).round().astype(np.int64))
    return w.windows(idx)[:, :WINDOW]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch directory (corpora, prepared data)")
    p.add_argument("--max-bytes", type=int, default=1_500_000, help="bytes per built-in domain (quickstart: 1.5 MB)")
    p.add_argument("--epsilons", default="8,4,1")
    p.add_argument("--units", default="document,window", help="DP units to measure: document, window")
    p.add_argument("--seeds", type=int, default=3, help="noise draws per DP row")
    p.add_argument("--splits", type=int, default=3, help="member / non-member splits the attack's AUC is averaged over")
    p.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    p.add_argument("--buckets", default="32768,1024", help="hash buckets of every profile (router-embed --ngram-buckets)")
    p.add_argument("--cap-bucket", type=float, default=DEFAULT_CAP_BUCKET)
    p.add_argument("--cap-total", type=float, default=DEFAULT_CAP_TOTAL)
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(a.work)
    corpora = build_builtin_corpora(work / "corpora", max_bytes_per_domain=a.max_bytes, seed=0)
    tok = ByteTokenizer()
    train, val, docs, split = {}, {}, {}, {}
    for d in ("public",) + OWNERS:
        docs[d] = _docs(corpora[d]["train"][0])
        train[d] = _prepare(docs[d], work / "prepared" / f"{d}-train", d)
        val[d] = _prepare(_docs(corpora[d]["val"][0]), work / "prepared" / f"{d}-val", d)
    for d in OWNERS:  # members / non-members for the attack: seeded random halves of the train documents
        split[d] = []
        for k in range(a.splits):
            order = list(range(len(docs[d])))
            random.Random(f"mia-{d}-{k}").shuffle(order)
            half = len(order) // 2
            members, nonmembers = [docs[d][i] for i in order[:half]], [docs[d][i] for i in order[half:]]
            split[d].append({"members": _prepare(members, work / "prepared" / f"{d}-members{k}", d),
                             "member_tokens": [np.append(tok.encode(x), tok.eos_id) for x in members],
                             "nonmember_tokens": [np.append(tok.encode(x), tok.eos_id) for x in nonmembers]})
    held_out = {d: _held_out_windows(val[d], a.windows) for d in ("public",) + OWNERS}
    slot_of = {"public": 0, **{d: i + 1 for i, d in enumerate(OWNERS)}}
    prep_s = time.perf_counter() - t0

    rows = []
    for buckets in [int(b) for b in a.buckets.split(",")]:
        public_profile = ngram_profile(train["public"], buckets)
        reference = {d: ngram_profile(val[d], buckets) for d in OWNERS}

        def measure(owner_profiles: dict[str, torch.Tensor], member_profiles: dict[str, list[torch.Tensor]]) -> dict:
            """Routing with the owners' profiles; the attack's AUC averaged over the splits."""
            profiles = torch.stack([public_profile] + [owner_profiles[d] for d in OWNERS])
            acc = routing_accuracy(held_out, profiles, slot_of)
            aucs = {d: float(np.mean([auc(membership_scores(sp["member_tokens"], prof, reference[d]),
                                          membership_scores(sp["nonmember_tokens"], prof, reference[d]))
                                      for sp, prof in zip(split[d], member_profiles[d])])) for d in OWNERS}
            return {"auc": aucs, "window_acc": {d: acc[d]["window"] for d in acc},
                    "token_acc": {d: acc[d]["token"] for d in acc}}

        rows.append((buckets, "exact", "-", measure(
            {d: ngram_profile(train[d], buckets) for d in OWNERS},
            {d: [ngram_profile(sp["members"], buckets) for sp in split[d]] for d in OWNERS})))
        for unit in [u for u in a.units.split(",") if u]:
            kw = dict(unit=unit, window=WINDOW, cap_bucket=a.cap_bucket, cap_total=a.cap_total, buckets=buckets)
            full = {d: directory_counts(train[d], **kw)[0] for d in OWNERS}
            half = {d: [directory_counts(sp["members"], **kw)[0] for sp in split[d]] for d in OWNERS}
            rows.append((buckets, "clipped (no noise)", unit, measure(
                {d: profile_from_noisy(full[d]) for d in OWNERS},
                {d: [profile_from_noisy(c) for c in half[d]] for d in OWNERS})))
            for eps in [float(e) for e in a.epsilons.split(",")]:
                b = noise_scale(eps, 0.0, "laplace", a.cap_bucket, a.cap_total)
                runs = []
                for s in range(a.seeds):
                    rng = np.random.default_rng([s, int(eps * 1000), buckets])
                    noisy = {d: profile_from_noisy(noisy_counts(full[d], "laplace", b, rng)) for d in OWNERS}
                    runs.append(measure(noisy, {d: [profile_from_noisy(noisy_counts(c, "laplace", b, rng))
                                                    for c in half[d]] for d in OWNERS}))
                mean = {k: {d: float(np.mean([r[k][d] for r in runs])) for d in runs[0][k]} for k in runs[0]}
                rows.append((buckets, f"epsilon {eps:g}", unit, mean))
        print(f"{buckets} buckets done after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    cpu = cpu_name()
    n_docs = {d: len(docs[d]) for d in OWNERS}
    cap_b = "none" if a.cap_bucket is None else f"{a.cap_bucket:g}"
    print(f"\n{os.cpu_count()} cores, {cpu}; 1 torch thread; {time.perf_counter() - t0:.0f} s in all "
          f"({prep_s:.0f} s corpora + preparation); built-in corpora at {a.max_bytes:,} bytes per domain, "
          f"train documents {n_docs}; caps per unit: {a.cap_total:g} in all, {cap_b} per bucket; Laplace noise; "
          f"DP rows: mean of {a.seeds} noise draws; AUC: mean of {a.splits} member/non-member splits; "
          f"{a.windows} held-out windows of {WINDOW} tokens per domain; acc: public/code/legal/math")
    print("| buckets | owner profiles | DP unit | AUC code | AUC legal | AUC math | window acc | token acc |")
    print("|" + "---|" * 8)
    for buckets, name, unit, r in rows:
        accs = "/".join(f"{r['window_acc'][d]:.2f}" for d in ("public",) + OWNERS)
        toks = "/".join(f"{r['token_acc'][d]:.2f}" for d in ("public",) + OWNERS)
        print(f"| {buckets} | {name} | {unit} | {r['auc']['code']:.3f} | {r['auc']['legal']:.3f} | "
              f"{r['auc']['math']:.3f} | {accs} | {toks} |")
    if a.json:
        Path(a.json).write_text(json.dumps([{"buckets": b, "profile": n, "unit": u, **r} for b, n, u, r in rows],
                                           indent=1))


if __name__ == "__main__":
    main()
