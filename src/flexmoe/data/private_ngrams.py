"""Differentially private n-gram profiles: the owner's hashed n-gram counts with each unit's
contribution bounded and calibrated noise added, so that the profile document routing reads
(`routing=anchor_ngram`) carries an (epsilon, delta) guarantee of its own.

The unit is one document when the prepared data records document boundaries (prepare-data's
manifest says `append_eos: true`; each document ends with the tokenizer's end-of-text token, and
their number must equal the manifest's `num_documents`), else a window of `window` consecutive
tokens. Each unit is counted on its own (no n-gram crosses a unit boundary), then clipped: every
bucket's count at most `cap_bucket` (default: no cap of its own, i.e. `cap_total`), the unit's
total at most `cap_total` (scaled down as a whole when over, which keeps the unit's relative
frequencies). Adding or removing one unit therefore changes the summed counts by at most
`cap_total` in L1 and `sqrt(cap_bucket * cap_total)` in L2 (entries in [0, cap_bucket] summing to
at most cap_total). A per-bucket cap only pays under Gaussian noise (L2), and costs frequency
information: at 8 per bucket, code's repeated indentation n-grams flatten out and code windows
stop routing to code even without noise (benchmarks/profile_privacy.py). Noise per bucket: Laplace of scale `cap_total / epsilon` (pure epsilon-DP), or
Gaussian with the smallest sigma the analytic Gaussian mechanism (Balle and Wang 2018) allows at
(epsilon, delta). The noisy counts are clamped to >= 0 and become the profile as exact counts do
(`profile_from_counts`): post-processing, at no further cost.

The whole directory is counted (no `max_tokens` cut: which units fall under a token cut depends
on every earlier unit, which would break the bound above).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from flexmoe.data.errors import DataError
from flexmoe.data.manifest import read_manifest_record
from flexmoe.data.ngrams import DEFAULT_BUCKETS, NGRAM_ORDERS, ngram_buckets, profile_from_counts

MECHANISMS = ("laplace", "gaussian")
UNITS = ("auto", "document", "window")
DEFAULT_CAP_TOTAL = 1024.0  # about one 256-token window's n-grams (4 orders)
DEFAULT_CAP_BUCKET = None  # no per-bucket cap beyond cap_total
DEFAULT_WINDOW = 256


# --- counting with bounded contributions ---------------------------------------------------------

def bucket_cap(cap_bucket: float | None, cap_total: float) -> float:
    """The per-bucket cap in force: `cap_bucket`, at most `cap_total` (None: `cap_total`)."""
    return float(cap_total) if cap_bucket is None else float(min(cap_bucket, cap_total))


def clipped_counts(tokens: np.ndarray, starts: np.ndarray, buckets: int, cap_bucket: float | None,
                   cap_total: float) -> tuple[np.ndarray, np.ndarray]:
    """Summed clipped bucket counts of the units of `tokens` -> (`[buckets]` float64, each unit's
    clipped total `[num_units]`). Unit j is tokens[starts[j]:starts[j+1]] (the last runs to the
    end); `starts[0]` must be 0. N-grams are counted inside a unit only."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    starts = np.asarray(starts, dtype=np.int64)
    if n == 0:
        return np.zeros(buckets), np.zeros(0)
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n:
        raise ValueError("unit starts must begin at 0, increase, and lie inside the tokens")
    unit_of = np.zeros(n, dtype=np.int64)
    unit_of[starts[1:]] = 1
    unit_of = np.cumsum(unit_of)
    ids = ngram_buckets(torch.from_numpy(tokens)[None], buckets)[0].numpy()  # [n, K]
    t = np.arange(n)
    keys = []
    for k, order in enumerate(NGRAM_ORDERS):
        first = t - order + 1
        ok = (first >= 0) & (ids[:, k] >= 0)
        ok[ok] &= unit_of[first[ok]] == unit_of[t[ok]]  # the n-gram lies inside one unit
        keys.append(unit_of[ok] * buckets + ids[ok, k])
    uniq, cnt = np.unique(np.concatenate(keys), return_counts=True)
    unit, bucket = uniq // buckets, uniq % buckets
    cnt = np.minimum(cnt.astype(np.float64), bucket_cap(cap_bucket, cap_total))
    totals = np.bincount(unit, weights=cnt, minlength=len(starts))
    scale = np.minimum(1.0, cap_total / np.maximum(totals, 1e-300))
    w = cnt * scale[unit]
    return np.bincount(bucket, weights=w, minlength=buckets), totals * scale


def sensitivity(mechanism: str, cap_bucket: float | None, cap_total: float) -> float:
    """How far one unit moves the clipped counts: L1 for Laplace, L2 for Gaussian."""
    if mechanism == "laplace":
        return float(cap_total)
    return float(min(cap_total, math.sqrt(bucket_cap(cap_bucket, cap_total) * cap_total)))


# --- mechanisms ----------------------------------------------------------------------------------

def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, sigma: float, l2: float = 1.0) -> float:
    """The exact delta of the Gaussian mechanism (noise sigma, L2 sensitivity l2) at epsilon
    (Balle and Wang 2018, Theorem 8)."""
    a, b = l2 / (2 * sigma), epsilon * sigma / l2
    tail = _phi(-a - b)
    return _phi(a - b) - (math.exp(epsilon) * tail if tail > 0 else 0.0)


def gaussian_sigma(epsilon: float, delta: float, l2: float = 1.0) -> float:
    """The smallest sigma (to 1e-9 relative) whose Gaussian mechanism is (epsilon, delta)-DP."""
    lo, hi = 1e-3 * l2, l2
    while gaussian_delta(epsilon, hi, l2) > delta:
        lo, hi = hi, 2 * hi
    while gaussian_delta(epsilon, lo, l2) <= delta:
        lo /= 2
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        if gaussian_delta(epsilon, mid, l2) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def noise_scale(epsilon: float, delta: float, mechanism: str, cap_bucket: float | None, cap_total: float) -> float:
    """Laplace scale b, or Gaussian sigma, for (epsilon, delta) at these caps."""
    check_budget(epsilon, delta, mechanism)
    s = sensitivity(mechanism, cap_bucket, cap_total)
    return s / epsilon if mechanism == "laplace" else gaussian_sigma(epsilon, delta, s)


def check_budget(epsilon: float, delta: float, mechanism: str) -> None:
    """Refuse a budget that gives no guarantee, naming the setting."""
    if mechanism not in MECHANISMS:
        raise DataError(f"--dp-mechanism={mechanism!r} is not {'|'.join(MECHANISMS)}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise DataError(f"--dp-epsilon={epsilon} must be a finite number > 0")
    if mechanism == "laplace" and delta != 0:
        raise DataError(f"--dp-delta={delta} with --dp-mechanism=laplace: Laplace noise is pure epsilon-DP; "
                        "leave --dp-delta at 0 or use --dp-mechanism=gaussian")
    if mechanism == "gaussian" and not 0 < delta < 1:
        raise DataError(f"--dp-delta={delta} must be in (0, 1) with --dp-mechanism=gaussian, e.g. 1e-6")


def noisy_counts(counts: np.ndarray, mechanism: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    """`counts` plus independent noise per bucket (before clamping)."""
    if mechanism == "laplace":
        return counts + rng.laplace(0.0, scale, size=counts.shape)
    return counts + rng.normal(0.0, scale, size=counts.shape)


def profile_from_noisy(noisy: np.ndarray) -> torch.Tensor:
    """Noisy counts clamped to >= 0, as a profile (`profile_from_counts`)."""
    return profile_from_counts(torch.from_numpy(np.maximum(noisy, 0.0)))


# --- a prepared data directory -------------------------------------------------------------------

def eos_id_of(manifest: dict[str, Any]) -> int | None:
    """The end-of-text id the data was prepared with (the spec's, else the tokenizer's)."""
    spec = manifest.get("tokenizer") or {}
    if spec.get("eos_id") is not None:
        return int(spec["eos_id"])
    from flexmoe.data.tokenize import load_tokenizer

    return load_tokenizer(spec).eos_id


def unit_kind(manifest: dict[str, Any], unit: str) -> str:
    """`document` or `window`: `auto` takes documents when the manifest records their boundaries."""
    if unit not in UNITS:
        raise DataError(f"--dp-unit={unit!r} is not {'|'.join(UNITS)}")
    has_docs = bool(manifest.get("append_eos")) and "num_documents" in manifest and eos_id_of(manifest) is not None
    if unit == "document" and not has_docs:
        raise DataError("--dp-unit=document: the data's manifest records no document boundaries (prepared without "
                        "end-of-text tokens); use --dp-unit=window")
    return "document" if unit == "document" or (unit == "auto" and has_docs) else "window"


def _units(stream, kind: str, eos_id: int | None, window: int, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, unit starts) pieces of the stream, each ending on a unit boundary."""
    n, a = stream.num_tokens, 0
    while a < n:
        if kind == "window":
            b = min(n, a + max(window, chunk // window * window))
            yield stream.tokens(a, b), np.arange(0, b - a, window)
            a = b
            continue
        b = min(n, a + chunk)
        tok = stream.tokens(a, b)
        ends = np.flatnonzero(tok == eos_id)
        while len(ends) == 0 and b < n:  # one document longer than the chunk: read on to its end
            b = min(n, b + chunk)
            tok = stream.tokens(a, b)
            ends = np.flatnonzero(tok == eos_id)
        stop = int(ends[-1]) + 1 if len(ends) and b < n else len(tok)
        tok = tok[:stop]
        starts = np.concatenate([[0], ends[ends + 1 < stop] + 1])
        yield tok, starts
        a += stop


def directory_counts(data_dir: str | Path, *, unit: str = "auto", window: int = DEFAULT_WINDOW,
                     cap_bucket: float | None = DEFAULT_CAP_BUCKET, cap_total: float = DEFAULT_CAP_TOTAL,
                     buckets: int = DEFAULT_BUCKETS, chunk: int = 1 << 20) -> tuple[np.ndarray, str, int]:
    """The clipped counts of a prepared data directory, before noise -> (`[buckets]` float64, the
    unit kind, the number of units)."""
    from flexmoe.data.dataset import TokenWindows

    stream = TokenWindows(data_dir, 1)
    kind = unit_kind(stream.manifest, unit)
    eos = eos_id_of(stream.manifest) if kind == "document" else None
    counts, num_units = np.zeros(buckets), 0
    for tok, starts in _units(stream, kind, eos, window, chunk):
        c, totals = clipped_counts(tok, starts, buckets, cap_bucket, cap_total)
        counts += c
        num_units += len(totals)
    if kind == "document" and num_units != stream.manifest["num_documents"]:
        raise DataError(f"{data_dir}: {num_units} end-of-text-delimited units but the manifest records "
                        f"{stream.manifest['num_documents']} documents (end-of-text tokens inside the text?); "
                        "use --dp-unit=window")
    return counts, kind, num_units


def private_ngram_profile(data_dir: str | Path, epsilon: float, *, delta: float = 0.0, mechanism: str = "laplace",
                          unit: str = "auto", window: int = DEFAULT_WINDOW,
                          cap_bucket: float | None = DEFAULT_CAP_BUCKET,
                          cap_total: float = DEFAULT_CAP_TOTAL, buckets: int = DEFAULT_BUCKETS,
                          noise_seed: int | None = None, chunk: int = 1 << 20) -> tuple[torch.Tensor, dict[str, Any]]:
    """The (epsilon, delta)-DP profile of a prepared data directory -> (`[buckets]` profile, the
    budget record that travels with it: epsilon, delta, mechanism, unit, caps, noise scale)."""
    if not (cap_total > 0 and window > 0 and (cap_bucket is None or cap_bucket > 0)):
        raise DataError(f"--dp-cap-bucket={cap_bucket}, --dp-cap-total={cap_total} and --dp-window={window} must be > 0")
    kind = unit_kind(read_manifest_record(data_dir), unit)
    if kind == "window":  # a window holds at most this many n-grams: a larger cap only adds noise
        cap_total = min(float(cap_total), float(sum(max(0, window - n + 1) for n in NGRAM_ORDERS)))
    scale = noise_scale(epsilon, delta, mechanism, cap_bucket, cap_total)
    counts, kind, num_units = directory_counts(data_dir, unit=unit, window=window, cap_bucket=cap_bucket,
                                               cap_total=cap_total, buckets=buckets, chunk=chunk)
    seed = noise_seed if noise_seed is not None else int.from_bytes(os.urandom(8), "little")
    noisy = noisy_counts(counts, mechanism, scale, np.random.default_rng([seed, 3]))
    record = {"epsilon": float(epsilon), "delta": float(delta), "mechanism": mechanism,
              "unit": "document" if kind == "document" else f"window of {window} tokens",
              "cap_bucket": bucket_cap(cap_bucket, cap_total), "cap_total": float(cap_total),
              "sensitivity": sensitivity(mechanism, cap_bucket, cap_total),
              "sensitivity_norm": "l1" if mechanism == "laplace" else "l2", "noise_scale": scale,
              "buckets": int(buckets), "orders": list(NGRAM_ORDERS), "num_units": int(num_units),
              "post_processing": "clamped to >= 0, smoothed log-frequency",
              "noise_seed": "fixed (not private)" if noise_seed is not None else "os.urandom"}
    return profile_from_noisy(noisy), record


# --- the total of an expert package ----------------------------------------------------------------

def total_budget(training_dp: dict[str, Any] | None, profile_dp: dict[str, Any] | None) -> dict[str, Any] | None:
    """Basic composition of the DP-SGD budget and the n-gram profile's budget: epsilons and deltas
    add. None unless both are DP (a non-private part leaves no total to state)."""
    if not training_dp or not profile_dp:
        return None
    return {"epsilon": float(training_dp["epsilon"]) + float(profile_dp["epsilon"]),
            "delta": float(training_dp["delta"]) + float(profile_dp["delta"]),
            "composition": "basic (training + n-gram profile)",
            "unit": f"data inside one {training_dp.get('unit', 'training window')} and one profile "
                    f"{profile_dp.get('unit', 'unit')}; a document over k training windows: "
                    "profile epsilon + k x training epsilon (group privacy)"}
