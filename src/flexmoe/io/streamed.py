"""A native model directory written one tensor at a time, from tensors made as they are written.

A sharded trainer gathers each tensor of its final model in turn (a collective) and the writer
appends it to `model.safetensors` and drops it: the header comes first, from the shapes and
dtypes known beforehand, and the file's sha256 and the fingerprint are taken from the same bytes
on the way. For that the tensors go in the order the fingerprint reads them: the anchor view's
tensors sorted by their anchor names (an expert tensor where its slot 0's dense name sorts),
then everything else (routers, routing buffers) by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from flexmoe.config.model import ModelConfig
from flexmoe.io.files import sha256_file
from flexmoe.io.fingerprint import anchor_view, bind_expert_hashes
from flexmoe.io.model_dir import CONFIG, META, atomic_dir, carry_tokenizer, write_json
from flexmoe.io.schema import MODEL_FORMAT
from flexmoe.io.shards import INDEX, index_record, plan_shards, shard_names
from flexmoe.io.dtypes import st_name
from flexmoe.io.stream import FilePool, read_header, write_all


@dataclass(frozen=True)
class Made:
    """A tensor of `dtype` and `shape` whose C-order values `make()` yields in pieces along dim 0."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Ref:
    """Stands in for a tensor in `anchor_view`, to learn which key (and slot) each anchor name takes."""

    def __init__(self, key: str, slot: int | None = None):
        self.key, self.slot = key, slot

    def __getitem__(self, j: int) -> "_Ref":
        return _Ref(self.key, j)


def fingerprint_order(keys) -> tuple[list[str], dict[str, tuple[str, bool]]]:
    """(the write order, {key: (its anchor name, whether only slot 0 counts)} for the anchor view's keys)."""
    keys = list(keys)
    anchored: dict[str, tuple[str, bool]] = {}
    for name, ref in sorted(anchor_view({k: _Ref(k) for k in keys}).items()):
        if ref.slot not in (None, 0):
            raise AssertionError(f"the fingerprint reads slot {ref.slot} of {ref.key}; the writer streams slot 0 only")
        anchored[ref.key] = (name, ref.slot is not None)
    return list(anchored) + sorted(k for k in keys if k not in anchored), anchored


class _Fingerprint:
    """`fingerprint.fingerprint` of the tensors written (which must come in `fingerprint_order`)."""

    def __init__(self, anchored: dict[str, tuple[str, bool]]):
        self.anchored, self.order = anchored, list(anchored)
        self.h, self._next, self._limit = hashlib.sha256(), 0, None

    def begin(self, name, src):
        self._limit = None
        if name not in self.anchored:
            return
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise AssertionError(f"{name} written out of the fingerprint's order")
        self._next += 1
        anchor, slot0 = self.anchored[name]
        shape = tuple(src.shape[1:]) if slot0 else tuple(src.shape)
        # Same record as fingerprint(): "name|dtype|shape\n", then the bytes (slot 0's: a prefix).
        self.h.update(f"{anchor}|{src.dtype}|{shape}\n".encode())
        self._limit = src.nbytes // src.shape[0] if slot0 and src.shape[0] else src.nbytes

    def update(self, name, offset, data):
        if self._limit is not None and offset < self._limit:
            self.h.update(data[:self._limit - offset])

    def hexdigest(self) -> str:
        if self._next != len(self.order):
            raise AssertionError(f"the fingerprint saw {self._next} of {len(self.order)} tensors")
        return self.h.hexdigest()


def needs_expert_hashes(cfg: ModelConfig, meta: dict[str, Any]) -> bool:
    """Whether a model's expert records carry tensor_sha256s (as `model_dir.save_model_dir` decides)."""
    experts = meta.get("experts") or []
    return cfg.is_moe and len(experts) == cfg.num_experts and (
        meta.get("kind") == "merged" or any("tensor_sha256" in e for e in experts))


def write_weights(path: Path, tensors: dict[str, Made], tap: _Fingerprint | None = None) -> str:
    """Write `tensors` (in dict order) as one safetensors file, header first; returns its sha256."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for k, t in tensors.items():
        header[k] = {"dtype": st_name(t), "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        for data in (struct.pack("<Q", len(raw)), raw):
            h.update(data)
            write_all(f, data)
        for k, t in tensors.items():
            if tap is not None:
                tap.begin(k, t)
            offset = 0
            for piece in t.make():
                if piece.dtype != t.dtype:
                    raise AssertionError(f"{k}: made a piece of {piece.dtype}, declared {t.dtype}")
                data = memoryview(piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
                h.update(data)
                if tap is not None:
                    tap.update(k, offset, data)
                write_all(f, data)
                offset += len(data)
            if offset != t.nbytes:
                raise AssertionError(f"{k}: made {offset} bytes, its header says {t.nbytes}")
    return h.hexdigest()


def write_streamed_model_dir(dst: str | Path, cfg: ModelConfig, sources: dict[str, Made],
                             make_meta: Callable[[str], dict[str, Any]], overwrite: bool = True,
                             max_shard_size: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Write `dst` atomically from `sources` (each made, written and dropped in turn, in
    `fingerprint_order`); `make_meta(fingerprint)` gives flexmoe.json's fields. Returns (dst, meta).
    `max_shard_size` (bytes): shards of at most that size with an index (the layout HF uses)
    instead of one model.safetensors; the fingerprint runs on across them."""
    order, anchored = fingerprint_order(sources)
    shards = plan_shards([(k, sources[k].nbytes) for k in order], max_shard_size)
    names = shard_names(len(shards))
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        tap = _Fingerprint(anchored)
        files = {name: write_weights(tmp / name, {k: sources[k] for k in keys}, tap) for name, keys in zip(names, shards)}
        if len(shards) > 1:
            text = json.dumps(index_record(names, shards, sum(sources[k].nbytes for k in order)), indent=2,
                              sort_keys=True) + "\n"
            (tmp / INDEX).write_text(text)
            files[INDEX] = hashlib.sha256(text.encode()).hexdigest()
        meta = make_meta(tap.hexdigest())
        cfg.save(tmp / CONFIG)
        if needs_expert_hashes(cfg, meta):  # read back from the files just written: expert slices only
            tensors: dict[str, Any] = {}
            for name in names:
                tensors.update(read_header(tmp / name)[0])
            with FilePool() as pool:
                meta = dict(meta, experts=bind_expert_hashes(meta["experts"], tensors, cfg.num_layers, pool.chunks))
        meta = {"format": MODEL_FORMAT, **carry_tokenizer(meta, tmp),
                "files": {**files, CONFIG: sha256_file(tmp / CONFIG)}}
        write_json(tmp / META, meta)
    return Path(dst), meta
