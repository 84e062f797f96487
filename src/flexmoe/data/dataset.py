"""Prepared token shards as fixed-length training windows, and weighted mixtures of domains."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexmoe.data.errors import DataError
from flexmoe.data.manifest import load_manifest


class TokenWindows:
    """All shards of one prepared directory as one token stream, cut into training windows.

    Window i holds tokens [i*seq_len, i*seq_len + seq_len + 1): inputs are window[:-1] and
    targets window[1:], and consecutive windows share one token so no target is skipped.
    Shards are memory-mapped, so opening a large dataset costs no RAM.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, *, verify: bool = True):
        self.data_dir = Path(data_dir)
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1; set a positive sequence length")
        self.seq_len = int(seq_len)
        self.manifest: dict[str, Any] = load_manifest(self.data_dir, verify=verify)
        self.domain: str = self.manifest.get("domain") or self.data_dir.name
        self._shards: list[np.ndarray] = []
        self._paths: list[Path] = []
        self._starts: list[int] = [0]  # token offset where each shard begins, plus the total
        want_dtype = np.dtype(self.manifest["dtype"])
        for shard in self.manifest["shards"]:
            path = self.data_dir / shard["path"]
            try:
                tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable shard ({e}); re-run prepare-data") from e
            if tokens.ndim != 1 or tokens.dtype != want_dtype or len(tokens) != shard["num_tokens"]:
                raise DataError(
                    f"{path}: holds {tokens.shape} {tokens.dtype}, manifest says ({shard['num_tokens']},) {want_dtype}; re-run prepare-data"
                )
            self._shards.append(tokens)
            self._paths.append(path)
            self._starts.append(self._starts[-1] + len(tokens))
        self.num_tokens: int = self._starts[-1]
        self._len = (self.num_tokens - 1) // self.seq_len if self.num_tokens > self.seq_len else 0
        if self._len == 0:
            raise DataError(
                f"{self.data_dir}: {self.num_tokens} tokens cannot fill one window of seq_len+1={self.seq_len + 1}; "
                "lower seq_len or add data"
            )

    def __len__(self) -> int:
        return self._len

    def shard_arrays(self) -> list[tuple[Path, np.ndarray]]:
        """(file, memory-mapped tokens) of every shard, in stream order."""
        return list(zip(self._paths, self._shards))

    def __getitem__(self, i: int) -> np.ndarray:
        """Window `i` as int64 tokens of length seq_len + 1 (copied out of the memmap)."""
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows in {self.data_dir}")
        start = i * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream as int64, crossing shard boundaries as needed."""
        k = bisect.bisect_right(self._starts, start) - 1
        if stop <= self._starts[k + 1]:  # the common case: inside one shard
            base = self._starts[k]
            return np.asarray(self._shards[k][start - base : stop - base], dtype=np.int64)
        out = np.empty(stop - start, dtype=np.int64)
        filled = 0
        while filled < len(out):
            base = self._starts[k]
            lo = start + filled - base
            piece = self._shards[k][lo : lo + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Several windows stacked as int64 [len(indices), seq_len + 1]."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self[i]
        return out

    def __repr__(self) -> str:
        return f"TokenWindows({str(self.data_dir)!r}, seq_len={self.seq_len}, windows={self._len})"


class Mixture:
    """Weighted mixture of domains: `Mixture({name: (TokenWindows, weight)})`.

    Weights are normalised to probabilities. Domains are kept in sorted name order so that the
    same mixture written in a different order samples identically.
    """

    def __init__(self, domains: Mapping[str, tuple[TokenWindows, float]]):
        if not domains:
            raise DataError("mixture: no domains given; name at least one domain with a weight")
        self.names: list[str] = sorted(domains)
        self.datasets: dict[str, TokenWindows] = {}
        weights = []
        for name in self.names:
            entry = domains[name]
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise DataError(f"mixture domain {name!r}: expected (TokenWindows, weight), got {entry!r}; fix the mixture")
            dataset, weight = entry
            weight = float(weight)
            if not (math.isfinite(weight) and weight > 0):
                raise DataError(f"mixture domain {name!r}: weight {weight} must be > 0; give a positive weight or drop the domain")
            self.datasets[name] = dataset
            weights.append(weight)
        lens = {name: ds.seq_len for name, ds in self.datasets.items()}
        if len(set(lens.values())) > 1:
            raise DataError(f"mixture domains have different seq_len {lens}; build every domain with the same seq_len")
        self.seq_len: int = next(iter(lens.values()))
        self.probs: np.ndarray = np.asarray(weights, dtype=np.float64) / sum(weights)

    @property
    def weights(self) -> dict[str, float]:
        """Normalised weight of each domain."""
        return {name: float(p) for name, p in zip(self.names, self.probs)}

    def sample_domains(self, num_samples: int, rng: np.random.Generator) -> np.ndarray:
        """Draw `num_samples` domain positions (indices into `names`) by weight."""
        return rng.choice(len(self.names), size=num_samples, p=self.probs)

    def sample_indices(self, num_samples: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        """Draw `(domain, window index)` pairs: domain by weight, window uniformly within it.

        This samples with replacement; `BatchLoader` uses `sample_domains` plus per-domain
        epoch permutations instead, so each domain is walked without repeats.
        """
        domains = self.sample_domains(num_samples, rng)
        return [(self.names[d], int(rng.integers(len(self.datasets[self.names[d]])))) for d in domains]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={p:.3f}" for n, p in zip(self.names, self.probs))
        return f"Mixture({parts})"
