"""`BatchLoader`: deterministic, resumable, data-parallel batches of token windows.

Sources yield either plain windows (`TokenWindows`: int arrays of seq_len + 1) or dict windows
(`SFTWindows`: tokens, loss_mask, doc_ids); dict windows are stacked key by key into a dict batch.

Every batch is a pure function of (seed, step) plus, for a mixture, each domain's cursor, so
resuming needs only a few ints and every rank agrees on the global batch without talking.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from flexmoe.data.dataset import Mixture, TokenWindows
from flexmoe.data.errors import DataError

STATE_VERSION = 1


class BatchLoader:
    """Infinite iterator of `torch.LongTensor [batch_size, seq_len + 1]` batches, or, for a source
    of dict windows (SFT), of dicts of tensors stacked per key (`tokens [B, S+1]`, `loss_mask [B, S]`,
    `doc_ids [B, S]`). Which windows make up a batch does not depend on the window type.

    Step s covers a global batch of `batch_size * world_size` samples; rank r takes the
    contiguous slice [r*batch_size, (r+1)*batch_size), so the ranks together see exactly what
    one process with batch_size*world_size would see.

    Single dataset: epoch e visits windows in the order `default_rng([seed, e]).permutation`
    (identity when shuffle=False), `steps_per_epoch` global batches per epoch, dropping the
    last partial one. Mixture: the domain of each global-batch position comes from
    `default_rng([seed, step])` and the mixture weights; each domain walks its own stream of
    epoch permutations through a cursor, so no window repeats before its domain's epoch ends.
    """

    def __init__(
        self,
        source: TokenWindows | Mixture | Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1; set a positive batch size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size; fix the launch settings")
        self.source = source
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.shuffle = bool(shuffle)
        self.global_batch_size = self.batch_size * self.world_size
        self.seq_len: int = source.seq_len
        self.step = 0
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        # Probe one window: dict windows (SFT) are stacked per key, plain ones as before.
        first = source.datasets[source.names[0]] if isinstance(source, Mixture) else source
        self.dict_windows = len(first) > 0 and isinstance(first[0], dict)
        if isinstance(source, Mixture):
            self.cursors: dict[str, int] = {name: 0 for name in source.names}
        elif len(source) < self.global_batch_size:
            raise DataError(
                f"{getattr(source, 'data_dir', source)}: {len(source)} windows cannot fill one global batch of "
                f"{self.global_batch_size} (batch_size x world_size); lower batch_size or seq_len, or add data"
            )

    # --- geometry ---------------------------------------------------------------------------
    @property
    def is_mixture(self) -> bool:
        """True when batches are drawn from a `Mixture`."""
        return isinstance(self.source, Mixture)

    @property
    def steps_per_epoch(self) -> int | None:
        """Global batches per epoch of a single dataset; None for a mixture (no common epoch)."""
        if self.is_mixture:
            return None
        return len(self.source) // self.global_batch_size

    @property
    def epoch(self) -> int | None:
        """Epoch the next batch comes from (single dataset only)."""
        spe = self.steps_per_epoch
        return None if spe is None else self.step // spe

    # --- permutations -----------------------------------------------------------------------
    def _permutation(self, key: str, seed_parts: list[int], n: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(key)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        # int32 halves the memory of a large epoch; shuffling it gives exactly the order of
        # default_rng(...).permutation(n).
        perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        if self.shuffle:
            np.random.default_rng([*seed_parts, epoch]).shuffle(perm)
        self._perm_cache[key] = (epoch, perm)
        return perm

    def _domain_window(self, name: str, ordinal: int) -> int:
        n = len(self.source.datasets[name])
        epoch, j = divmod(int(ordinal), n)
        # crc32, not hash(): Python's str hash changes per process and would break resume.
        perm = self._permutation(name, [self.seed, zlib.crc32(name.encode("utf-8"))], n, epoch)
        return int(perm[j])

    # --- batches ----------------------------------------------------------------------------
    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        batch = self._mixture_batch() if self.is_mixture else self._single_batch()
        self.step += 1
        if isinstance(batch, dict):
            return {k: torch.from_numpy(v) for k, v in batch.items()}
        return torch.from_numpy(batch)

    def _single_batch(self) -> np.ndarray | dict[str, np.ndarray]:
        spe = self.steps_per_epoch
        epoch, s = divmod(self.step, spe)
        perm = self._permutation("", [self.seed], len(self.source), epoch)
        start = s * self.global_batch_size + self.rank * self.batch_size
        if self.dict_windows:
            return _stack_dicts([self.source[int(i)] for i in perm[start : start + self.batch_size]])
        return self.source.windows(perm[start : start + self.batch_size])

    def _mixture_batch(self) -> np.ndarray | dict[str, np.ndarray]:
        mixture: Mixture = self.source
        domains = mixture.sample_domains(self.global_batch_size, np.random.default_rng([self.seed, self.step]))
        lo = self.rank * self.batch_size
        # Dict windows are collected in batch order and stacked at the end; the draw of domains
        # and cursors is exactly the plain path's, so both kinds of source batch the same windows.
        out: Any = ([None] * self.batch_size if self.dict_windows
                    else np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64))
        for d, name in enumerate(mixture.names):
            positions = np.flatnonzero(domains == d)
            # Every rank advances every cursor by the whole global batch, so cursors stay equal.
            ordinals = self.cursors[name] + np.arange(len(positions))
            mine = (positions >= lo) & (positions < lo + self.batch_size)
            dataset = mixture.datasets[name]
            for pos, ordinal in zip(positions[mine], ordinals[mine]):
                out[pos - lo] = dataset[self._domain_window(name, ordinal)]
            self.cursors[name] += len(positions)
        return _stack_dicts(out) if self.dict_windows else out

    # --- resume -----------------------------------------------------------------------------
    def _num_windows(self) -> int | dict[str, int]:
        if self.is_mixture:
            return {name: len(ds) for name, ds in self.source.datasets.items()}
        return len(self.source)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: loading it makes the next batch the one that would come next."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "num_windows": self._num_windows(),
        }
        if self.is_mixture:
            state["cursors"] = dict(self.cursors)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refuses state from different data or sampling settings.

        world_size may change if batch_size * world_size stays the same: the global batch is
        then unchanged and only its slicing between ranks differs.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; resume with a matching flexmoe")
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "shuffle", "num_windows"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                    "resume with the same data, seed and batch_size x world_size"
                )
        self.step = int(state["step"])
        if self.is_mixture:
            self.cursors = {name: int(state["cursors"][name]) for name in self.source.names}
        self._perm_cache.clear()


def _stack_dicts(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack dict windows key by key; every window must carry the same keys."""
    keys = list(items[0])
    if any(list(it) != keys for it in items[1:]):
        raise DataError(f"windows with different keys in one batch ({keys} vs others); use one data format per run")
    return {k: np.stack([it[k] for it in items]) for k in keys}
