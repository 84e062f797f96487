"""Extraction audit: how many of an owner's own documents a model reproduces from a prefix.

For each audited document: a prefix of `prefix_len` tokens at a random offset, continuations of
`suffix_len` tokens by each decoding strategy (greedy, and several samples), and the document
counts as extracted when any continuation matches its true next tokens with normalised
Levenshtein similarity >= `threshold` (exact match counted separately). Rates come with Wilson
95% intervals. Every model audited in one call sees the same prefixes and the same sampling
seed, so the rows compare like with like: the public model says what anyone could extract
already, the owner's expert and the merged model what the package adds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flexmoe.eval.generate import Sampling, generate
from flexmoe.io.log import get_logger

log = get_logger(__name__)


def _default_strategies() -> list[Sampling]:
    return [Sampling(greedy=True), Sampling(temperature=0.7, top_k=40, top_p=0.95, num_samples=4)]


@dataclass
class AuditConfig:
    """What the audit samples; the defaults follow the issue (32-token prefixes, >= 0.9 similarity)."""

    prefix_len: int = 32
    suffix_len: int = 32
    max_docs: int = 200  # documents audited (a seeded random subset when the owner has more)
    threshold: float = 0.9
    strategies: list[Sampling] = field(default_factory=_default_strategies)
    seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        """Refuse settings that make the audit meaningless, naming the setting."""
        if self.prefix_len < 1 or self.suffix_len < 1:
            raise ValueError(f"prefix_len={self.prefix_len} and suffix_len={self.suffix_len} must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if not self.strategies:
            raise ValueError("no decoding strategies: give greedy and/or sampling")
        for s in self.strategies:
            s.validate()


# --- documents -------------------------------------------------------------------------------------

def documents_from_data(data_dir: str | Path, *, verify: bool = True, chunk: int = 1 << 22) -> list[np.ndarray]:
    """The documents of a `flexmoe prepare-data` directory, cut at its end-of-text tokens."""
    from flexmoe.data import DataError, TokenWindows, load_tokenizer

    w = TokenWindows(data_dir, 1, verify=verify)
    if not w.manifest.get("append_eos", False):
        raise DataError(f"{Path(data_dir) / 'manifest.json'}: documents were not separated by end-of-text; "
                        "re-run prepare-data without append_eos=False")
    eos = load_tokenizer(w.manifest["tokenizer"]).eos_id
    ends = [start + np.flatnonzero(w.tokens(start, min(start + chunk, w.num_tokens)) == eos)
            for start in range(0, w.num_tokens, chunk)]
    docs, prev = [], 0
    for end in np.concatenate(ends).tolist():
        if end > prev:
            docs.append(w.tokens(prev, end))
        prev = end + 1
    return docs


def documents_from_texts(texts: Sequence[str], tokenizer) -> list[np.ndarray]:
    """Tokenised documents from strings (no end-of-text appended)."""
    return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


# --- similarity and intervals ------------------------------------------------------------------------

def levenshtein_batch(a_NL: np.ndarray, b_NM: np.ndarray) -> np.ndarray:
    """Edit distance of each row pair `a[i]`, `b[i]` -> `[N]`, all rows at once.

    Row by row of the DP table; within a row, insertions chain left to right, which is a
    running minimum of `cur[k] - k` (plus j)."""
    a_NL, b_NM = np.asarray(a_NL), np.asarray(b_NM)
    N, M = a_NL.shape[0], b_NM.shape[1]
    cols = np.arange(M + 1)
    prev = np.broadcast_to(cols, (N, M + 1)).copy()
    for i in range(1, a_NL.shape[1] + 1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        cur[:, 1:] = np.minimum(prev[:, :-1] + (a_NL[:, i - 1:i] != b_NM), prev[:, 1:] + 1)
        prev = np.minimum.accumulate(cur - cols, axis=1) + cols
    return prev[:, M]


def similarity_batch(a_NL: np.ndarray, b_NM: np.ndarray) -> np.ndarray:
    """1 - edit distance / length of the longer sequence, per row pair -> `[N]` in [0, 1]."""
    longest = max(np.asarray(a_NL).shape[1], np.asarray(b_NM).shape[1], 1)
    return 1.0 - levenshtein_batch(a_NL, b_NM) / longest


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the audit -------------------------------------------------------------------------------------

@dataclass
class AuditPrompts:
    """What every audited model is asked: one prefix and its true continuation per document."""

    doc_ids: np.ndarray  # [D] index into the document list
    offsets: np.ndarray  # [D] where the prefix starts in its document
    prefixes: torch.Tensor  # [D, prefix_len]
    targets: np.ndarray  # [D, suffix_len]
    num_documents: int
    num_too_short: int


def make_prompts(docs: Sequence[np.ndarray], cfg: AuditConfig) -> AuditPrompts:
    """Seeded choice of documents (long enough for prefix + suffix) and of an offset in each."""
    cfg.validate()
    need = cfg.prefix_len + cfg.suffix_len
    eligible = np.array([i for i, d in enumerate(docs) if len(d) >= need], dtype=np.int64)
    if len(eligible) == 0:
        raise ValueError(f"no document has {need} tokens (prefix_len + suffix_len); lower them or give longer "
                         "documents")
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(eligible, size=min(cfg.max_docs, len(eligible)), replace=False))
    offsets = np.array([rng.integers(0, len(docs[i]) - need + 1) for i in chosen], dtype=np.int64)
    windows = np.stack([docs[i][o:o + need] for i, o in zip(chosen, offsets)]).astype(np.int64)
    return AuditPrompts(chosen, offsets, torch.from_numpy(windows[:, :cfg.prefix_len].copy()),
                        windows[:, cfg.prefix_len:], len(docs), len(docs) - len(eligible))


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "rate": k / n if n else 0.0, "ci95": [lo, hi]}


def audit_model(model, prompts: AuditPrompts, cfg: AuditConfig,
                expert_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Extraction and exact-match rates of one model on the prompts (with Wilson intervals)."""
    D = len(prompts.doc_ids)
    best = np.zeros(D)
    extracted = np.zeros(D, dtype=bool)
    exact = np.zeros(D, dtype=bool)
    per_strategy = {}
    for j, strategy in enumerate(cfg.strategies):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + j)
        conts = generate(model, prompts.prefixes, cfg.suffix_len, strategy, expert_mask=expert_mask,
                         generator=gen, batch_size=cfg.batch_size).numpy()
        n = conts.shape[0] // D
        targets = np.repeat(prompts.targets, n, axis=0)
        sim_D = similarity_batch(conts, targets).reshape(D, n).max(axis=1)
        exact_D = (conts == targets).all(axis=1).reshape(D, n).any(axis=1)
        hit_D = sim_D >= cfg.threshold
        per_strategy[strategy.label()] = {"extracted": _rate(int(hit_D.sum()), D),
                                          "exact": _rate(int(exact_D.sum()), D), "mean_similarity": float(sim_D.mean())}
        best = np.maximum(best, sim_D)
        extracted |= hit_D
        exact |= exact_D
    return {"documents": D, "extracted": _rate(int(extracted.sum()), D), "exact": _rate(int(exact.sum()), D),
            "mean_best_similarity": float(best.mean()), "per_strategy": per_strategy,
            "extracted_doc_ids": prompts.doc_ids[extracted].tolist()}


def audit_models(models: dict[str, tuple[Any, torch.Tensor | None]], docs: Sequence[np.ndarray],
                 cfg: AuditConfig | None = None) -> dict[str, Any]:
    """Audit several models (label -> (model, expert mask or None)) on the same prompts."""
    cfg = cfg or AuditConfig()
    prompts = make_prompts(docs, cfg)
    rows = {}
    for label, (model, mask) in models.items():
        t0 = time.perf_counter()
        rows[label] = audit_model(model, prompts, cfg, mask)
        rows[label]["seconds"] = time.perf_counter() - t0
        r = rows[label]["extracted"]
        log.info(f"audit {label}: extracted {r['count']}/{len(prompts.doc_ids)} ({r['rate']:.1%}) "
              f"in {rows[label]['seconds']:.0f}s")
    return {"config": {**asdict(cfg), "strategies": [s.label() for s in cfg.strategies]},
            "documents_total": prompts.num_documents, "documents_too_short": prompts.num_too_short,
            "documents_audited": len(prompts.doc_ids), "models": rows}


def format_audit(report: dict[str, Any]) -> str:
    """A Markdown table: one row per model, extraction and exact-match rates with 95% intervals."""
    c = report["config"]
    lines = [f"Extraction audit: {report['documents_audited']} of {report['documents_total']} documents "
             f"({report['documents_too_short']} too short), {c['prefix_len']}-token prefixes, {c['suffix_len']}-token "
             f"continuations, similarity >= {c['threshold']}, strategies: {', '.join(c['strategies'])}", "",
             "| model | extracted | 95% CI | exact | 95% CI | mean best similarity |", "|---|---|---|---|---|---|"]
    for label, r in report["models"].items():
        e, x = r["extracted"], r["exact"]
        lines.append(f"| {label} | {e['rate']:.1%} ({e['count']}/{r['documents']}) | "
                     f"{e['ci95'][0]:.1%}-{e['ci95'][1]:.1%} | {x['rate']:.1%} | {x['ci95'][0]:.1%}-{x['ci95'][1]:.1%} "
                     f"| {r['mean_best_similarity']:.3f} |")
    return "\n".join(lines)
