"""The public model's identity (sha256 over its shared tensors and its FFN, the anchor), and each
expert slot's identity in a merged model (`tensor_sha256`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from flexmoe.config.model import NATIVE_BUFFERS
from flexmoe.io.digests import is_parts
from flexmoe.io.dtypes import text
from flexmoe.io.errors import CheckpointError
from flexmoe.io.keys import EXPERT_WEIGHTS, dense_ffn_key, experts_key, is_router_key, parse_experts_key, router_weight_key


def anchor_view(sd: dict[str, Any]) -> dict[str, Any]:
    """The tensors every model branched from one public model shares, named as in the dense model.

    Routers and non-anchor experts are left out; expert slot 0 is the public FFN.
    """
    out = {}
    for k, v in sd.items():
        if is_router_key(k) or k in NATIVE_BUFFERS:  # routing state, per expert
            continue
        parsed = parse_experts_key(k)
        if parsed:
            out[dense_ffn_key(*parsed)] = v[0]
        else:
            out[k] = v
    return out


def fingerprint(sd: dict[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of the anchor view (torch tensors) in sorted key order."""
    h = hashlib.sha256()
    for k, v in sorted(anchor_view(sd).items()):
        h.update(f"{k}|{text(v)}|{tuple(v.shape)}\n".encode())
        for c in _tensor_bytes(v):
            h.update(c)
    return h.hexdigest()


# --- per-expert hashes: bind a merged model's expert records to that slot's tensors ------------------

def _tensor_bytes(t) -> Iterator[bytes]:
    """The C-order bytes of an in-memory tensor (one piece)."""
    import torch

    t = t.detach().contiguous().cpu()
    yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def expert_record_keys(num_layers: int) -> list[str]:
    """The tensors a slot's tensor_sha256 covers, in the order it reads them."""
    return [key for i in range(num_layers) for key in [experts_key(i, n) for n in EXPERT_WEIGHTS] + [router_weight_key(i)]]


TENSOR_SHA256_FORMAT = 2  # what writers bind; a record without `tensor_sha256_format` is 1


def record_format(expert: Mapping[str, Any]) -> int:
    """The definition an expert record's tensor_sha256 follows (1 when the record does not say)."""
    return int(expert.get("tensor_sha256_format", 1))


def bound(expert: dict[str, Any], digest: str) -> dict[str, Any]:
    """The expert record bound to its slot by `digest`, a TENSOR_SHA256_FORMAT tensor_sha256."""
    return dict(expert, tensor_sha256=digest, tensor_sha256_format=TENSOR_SHA256_FORMAT)


def slot_line(key: str, slot: int, dtype: str, shape, leaf: str) -> str:
    """Format 2's line for one tensor of a slot: name, slot, dtype (as torch prints it: io.dtypes.text),
    shape and the sha256 of its bytes."""
    return f"{key}[{slot}]|{dtype}|{tuple(shape)}|{leaf}\n"


def compose(lines: Iterable[str]) -> str:
    """Format 2's tensor_sha256: the sha256 of the slot's lines (slot_line), in record order."""
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def expert_tensor_sha256(sd: Mapping[str, Any], slot: int, num_layers: int,
                         chunks: Callable[[Any], Iterable[bytes]] = _tensor_bytes, version: int = TENSOR_SHA256_FORMAT,
                         leaves: Callable[[str, int], str | None] | None = None) -> str:
    """One expert slot's identity over its FFN tensors and router row in every layer.

    Format 1: the sha256 over each tensor's "name[slot]|dtype|shape" line and bytes, in record order.
    Format 2: the sha256 over each tensor's slot_line, which carries the sha256 of that tensor's bytes
    (its leaf): a leaf is the digest of one part of a parts-recorded file (io.digests), so a merge
    composes its records from digests its inputs' verified records give, and a reader whose files
    were verified part by part takes `leaves(key, slot)` instead of hashing the bytes again.
    `sd` holds torch tensors, or lazy tensors with `chunks` yielding their bytes (io.stream's
    `FilePool.chunks`): both give the same digest, so a model too large to load is checked streaming."""
    h, lines = hashlib.sha256(), []
    for key in expert_record_keys(num_layers):
        if key not in sd:
            raise CheckpointError(f"tensor {key} missing: not a merged MoE state dict")
        t = sd[key][slot]
        if version == 1:
            h.update(f"{key}[{slot}]|{text(t)}|{tuple(t.shape)}\n".encode())
            for c in chunks(t):
                h.update(c)
            continue
        leaf = leaves(key, slot) if leaves is not None else None
        if leaf is None:
            part = hashlib.sha256()
            for c in chunks(t):
                part.update(c)
            leaf = part.hexdigest()
        lines.append(slot_line(key, slot, text(t), t.shape, leaf))
    return h.hexdigest() if version == 1 else compose(lines)


def parts_leaves(files: Mapping[str, Any], tensors: Mapping[str, Any]) -> Callable[[str, int], str | None]:
    """`leaves` for expert_tensor_sha256 from verified files entries: a slot that is exactly one part
    of a parts-recorded file (`files`: name -> entry, checked against the bytes just before) takes
    that part's sha256. `tensors`: the lazy tensors (io.stream) of those files."""
    known: dict[tuple[str, int, int], str] = {}
    for name, entry in files.items():
        if is_parts(entry):
            start = 0
            for length, digest in entry["parts"]:
                known[(name, start, length)] = digest
                start += length

    def leaf(key: str, slot: int) -> str | None:
        spans = tensors[key][slot].spans
        s = spans[0] if len(spans) == 1 else None
        return None if s is None else known.get((s.path.name, s.start, s.length))

    return leaf


def verify_expert_hashes(sd: Mapping[str, Any], meta: dict[str, Any], num_layers: int, where: str | Path = "",
                         chunks: Callable[[Any], Iterable[bytes]] = _tensor_bytes, meta_name: str = "flexmoe.json",
                         leaves: Callable[[str, int], str | None] | None = None) -> int:
    """Check every `tensor_sha256` in meta's experts against `sd` (each by its record's format, with
    verified `leaves` where given: see expert_tensor_sha256); returns how many were checked.

    Which entries must carry one is the reader's rule (a merged model: all of them, see
    model_dir.check_model_meta); an entry without one is skipped here."""
    checked = 0
    experts = meta.get("experts") or []
    for j, e in enumerate(experts):
        want = e.get("tensor_sha256")
        if not want:
            continue
        if j >= _num_slots(sd):
            raise CheckpointError(f"{Path(where) / meta_name}: lists {len(experts)} experts, the weights hold "
                                  f"{_num_slots(sd)}; the record does not belong to these weights")
        try:
            digest = expert_tensor_sha256(sd, j, num_layers, chunks, version=record_format(e), leaves=leaves)
        except CheckpointError as e:  # name the directory: the bare message names only a tensor
            raise CheckpointError(f"{where}: {e}") from e
        if digest != want:
            raise CheckpointError(f"{Path(where) / meta_name}: expert slot {j} ({e.get('owner')}/{e.get('domain')}) "
                                  "does not match its tensor_sha256; the expert was swapped or altered, do not use "
                                  "this model")
        checked += 1
    return checked


def _num_slots(sd: Mapping[str, Any]) -> int:
    t = sd.get(router_weight_key(0))
    return int(t.shape[0]) if t is not None else 0


def bind_expert_hashes(experts: list[dict[str, Any]], sd: Mapping[str, Any], num_layers: int,
                       chunks: Callable[[Any], Iterable[bytes]] = _tensor_bytes, *,
                       check_against: str | Path | None = None) -> list[dict[str, Any]]:
    """The experts list with each entry's `tensor_sha256` set from `sd` (one entry per slot, in order).

    Writers call it: a model written by flexmoe always carries hashes that fit its tensors (slots
    renumbered by remove-expert, routers changed by router tuning). With `check_against` (the
    file that listed them), an entry's existing hash must match first, as import-hf requires of
    the hashes an export carried."""
    out = []
    for j, e in enumerate(experts):
        digest = expert_tensor_sha256(sd, j, num_layers, chunks)
        if check_against is not None and e.get("tensor_sha256") is not None:
            had = digest if record_format(e) == TENSOR_SHA256_FORMAT else \
                expert_tensor_sha256(sd, j, num_layers, chunks, version=record_format(e))
            if had != e["tensor_sha256"]:
                raise CheckpointError(f"{check_against}: expert slot {j} ({e.get('owner')}/{e.get('domain')}) does "
                                      "not match its tensor_sha256; the expert was swapped or altered, do not use this "
                                      "model")
        out.append(bound(e, digest))
    return out


def stream_fingerprint(tensors: Mapping[str, Any], pool) -> str:
    """`fingerprint` of a native state dict of lazy tensors (io.stream), read through `pool` (a
    FilePool) without loading it."""
    h = hashlib.sha256()
    for k, v in sorted(anchor_view(tensors).items()):
        # Same record as fingerprint(): "name|dtype|shape\n" then the raw bytes.
        h.update(f"{k}|{text(v)}|{tuple(v.shape)}\n".encode())
        for c in pool.chunks(v):
            h.update(c)
    return h.hexdigest()
