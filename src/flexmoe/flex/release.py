"""Release without one owner's expert: its FFN tensors and router rows physically gone.

Opt-out masks an expert at inference; a release that must not carry an expert at all (its
owner withdrew consent) drops it. The result computes what the source model computes with that
expert masked, and is checked byte for byte to hold no slice of the removed expert.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

from flexmoe.io.dtypes import text
from flexmoe.io.fingerprint import TENSOR_SHA256_FORMAT, bound, compose, record_format, slot_line
from flexmoe.io.native import expert_tap, open_native, parse_size, write_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import META, CheckpointError, atomic_dir, refuse_overlap
from flexmoe.io.stream import FilePool, LazyTensor
from flexmoe.io.writer import Skipped, SlotTap, Stacked, nbytes
from flexmoe.io.keys import is_per_expert_key


def remove_expert(src: str | Path, dst: str | Path, name: str, *, overwrite: bool = False, verify: bool = True,
                  max_shard_size: int | str | None = None) -> Path:
    """Write `src` without the expert whose owner or domain is `name`; returns `dst`.

    Refuses slot 0 (the public expert every other one was trained against), unknown or
    ambiguous names, and any result in which a slice of the removed expert survives. `src` is
    checked (file sha256s and each expert's tensor_sha256, unless `verify` is False) by the one
    pass that reads it: the removed slot's bytes are read in place, hashed and not written, the
    kept ones copied; a mismatch anywhere discards the output before it is renamed into place, so
    the expert named is the one whose tensors go. `max_shard_size` (bytes or '5GB'): shards.
    """
    src = Path(src)
    limit = parse_size(max_shard_size)
    refuse_overlap(dst, [src], "DST")
    with FilePool() as pool:
        cfg, tensors, meta = open_native(src, verify=verify, defer=pool)
        try:
            return _remove(src, Path(dst), name, cfg, tensors, meta, pool, overwrite=overwrite, verify=verify, limit=limit)
        except CheckpointError as e:  # a corrupted source explains the rest: say that first
            err = pool.blame(e)
            if err is e:
                raise
            raise err from e


def _remove(src: Path, dst: Path, name: str, cfg, tensors, meta, pool: FilePool, *, overwrite, verify, limit) -> Path:
    experts = meta.get("experts") or []
    if not cfg.is_moe or len(experts) != cfg.num_experts:
        raise CheckpointError(f"{src / 'flexmoe.json'}: lists {len(experts)} experts for a model with "
                              f"num_experts={cfg.num_experts}; remove-expert needs a merged model")
    slot = _find_slot(src, experts, name)
    keep = [j for j in range(cfg.num_experts) if j != slot]
    removed = _Removed(slot, cfg.num_layers)
    out: dict[str, Any] = {}
    for k, t in tensors.items():
        if not is_per_expert_key(k):
            out[k] = t
            continue
        # The removed slot is read where it lies (so the file is read front to back) and not written.
        parts = tuple(removed.part(k, t[j]) if j == slot else t[j] for j in range(cfg.num_experts))
        out[k] = Stacked(t.st, (len(keep),) + tuple(t.shape[1:]), parts)
    new_cfg = cfg.replace(num_experts=len(keep), top_k=min(cfg.top_k, len(keep)))
    record = dict(experts[slot], removed=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    # Slots move up, and a slot's tensor_sha256 names its slot: kept slot i (source slot keep[i]) is
    # hashed under both numbers, to bind the new record and to verify the source's.
    # (the source's in the format of its record).
    hashes = expert_tap(new_cfg, [[i, (j, record_format(experts[j]))] for i, j in enumerate(keep)])
    written = _Digests()

    def finish(new_meta: dict[str, Any]) -> dict[str, Any]:
        got = hashes.digests()
        if verify:
            source = {j: got[(i, j, record_format(experts[j]))] for i, j in enumerate(keep)} | \
                {slot: removed.digest(record_format(experts[slot]))}
            for j, e in enumerate(experts):
                if e.get("tensor_sha256") and source[j] != e["tensor_sha256"]:
                    raise CheckpointError(f"{src / META}: expert slot {j} ({e.get('owner')}/{e.get('domain')}) does not "
                                          "match its tensor_sha256; the expert was swapped or altered, do not use this "
                                          "model")
        _prove_absent(removed, written, tensors)
        kept = [bound(dict(experts[j], slot=i), got[(i, i, TENSOR_SHA256_FORMAT)]) for i, j in enumerate(keep)]
        return dict(new_meta, experts=kept, removed=list(meta.get("removed") or []) + [record])

    with atomic_dir(dst, overwrite=overwrite, flag="--overwrite") as tmp:
        progress = Progress(f"remove-expert {name}", sum(nbytes(t) for t in out.values()))
        write_native(tmp, new_cfg, out, meta, pool, progress, max_shard_size=limit, taps=(hashes, written),
                     finish=finish)
        progress.finish(f"expert {slot} ({experts[slot]['owner']}/{experts[slot]['domain']}) removed -> {dst}")
    return dst


class _Removed:
    """What the pass sees of the removed slot: each slice's sha256 (and whether it is all zeros), and the
    slot's tensor_sha256 in the source (io.fingerprint.expert_tensor_sha256, same record order)."""

    def __init__(self, slot: int, num_layers: int):
        from flexmoe.io.fingerprint import expert_record_keys

        self.slot, self.expert_hash = slot, hashlib.sha256()
        self.order = expert_record_keys(num_layers)
        self.records = set(self.order)  # membership; the pass reads them in record order
        self.slices: dict[str, tuple[Any, bool, LazyTensor]] = {}

    def part(self, key: str, t: LazyTensor) -> Skipped:
        def begin():
            self.slices[key] = (hashlib.sha256(), False, t)
            if key in self.records:
                self.expert_hash.update(f"{key}[{self.slot}]|{text(t)}|{tuple(t.shape)}\n".encode())

        def piece(c):
            h, nonzero, _ = self.slices[key]
            h.update(c)
            if key in self.records:
                self.expert_hash.update(c)
            self.slices[key] = (h, nonzero or bool(torch.frombuffer(c, dtype=torch.uint8).any()), t)
        return Skipped(t, begin, piece)

    def digest(self, version: int) -> str:
        """The removed slot's tensor_sha256 in the source, in format `version` (io.fingerprint)."""
        if version == 1:
            return self.expert_hash.hexdigest()
        return compose(slot_line(k, self.slot, text(self.slices[k][2]), self.slices[k][2].shape,
                                 self.slices[k][0].hexdigest()) for k in self.order)

    def secrets(self) -> dict[str, tuple[str, LazyTensor]]:
        """sha256 -> (name, slice) of each slice that could identify the expert.

        Left out: scalars (a router bias value is one float, equal to countless others by chance)
        and all-zero slices (an unset router row says nothing about the owner and equals every other
        unset row)."""
        return {h.hexdigest(): (f"{k}[{self.slot}]", t) for k, (h, nonzero, t) in self.slices.items()
                if t.shape and nonzero}


class _Digests(SlotTap):
    """sha256 of every tensor written and of every dim-0 slice of one with two or more dims."""

    def __init__(self):
        super().__init__(())
        self.found: list[tuple[str, str]] = []  # (digest, name) in the order written
        self._whole = None

    def begin(self, name, src):
        self._whole = (name, hashlib.sha256())
        self.names = {name} if len(src.shape) >= 2 else set()
        super().begin(name, src)

    def wants(self, name):
        return True  # every tensor's whole digest

    def update(self, name, offset, data, jobs):
        jobs.append(functools.partial(self._whole[1].update, data))
        super().update(name, offset, data, jobs)

    def start(self, name, src):
        self._slots = [hashlib.sha256() for _ in range(src.shape[0])]

    def slot(self, name, j, at, data, jobs):
        jobs.append(functools.partial(self._slots[j].update, data))

    def end(self, name):
        self.found.append((self._whole[1].hexdigest(), name))
        if self._cur is not None:
            self.found += [(h.hexdigest(), f"{name}[{j}]") for j, h in enumerate(self._slots)]
        super().end(name)


def _prove_absent(removed: _Removed, written: _Digests, tensors: dict[str, LazyTensor]) -> None:
    """No tensor written, and no slice along dim 0 of one, may equal a removed slice."""
    secrets = removed.secrets()
    for digest, part_key in written.found:
        hit = secrets.get(digest)
        if hit is not None:
            raise CheckpointError(f"{hit[1].path}: the removed expert's {hit[0]} is byte-identical to {part_key} of "
                                  "the release (an untrained copy?), so the release cannot prove it is gone")


def _find_slot(src: Path, experts: list[dict[str, Any]], name: str) -> int:
    hits = [j for j, e in enumerate(experts) if name in (e.get("owner"), e.get("domain"))]
    known = sorted({e.get("owner") for e in experts[1:]} | {e.get("domain") for e in experts[1:]})
    if not hits:
        raise CheckpointError(f"{src / 'flexmoe.json'}: no expert named {name!r}; known owners/domains: {known}")
    if 0 in hits:
        raise CheckpointError(f"{src / 'flexmoe.json'}: {name!r} is slot 0, the public expert every other expert was "
                              "trained against; it cannot be removed (known owners/domains: " + ", ".join(known) + ")")
    if len(hits) > 1:
        raise CheckpointError(f"{src / 'flexmoe.json'}: {name!r} names experts {hits}; give a domain that names one")
    return hits[0]


def release_for_use(src: str | Path, scratch: Path, *, use: str | None, allow_unrecorded: bool = False,
                    today: str | None = None, verify: bool = True) -> tuple[Path, list[str]]:
    """The model a release for `use` may carry: `src` itself, or `src` with every owner expert whose
    consent does not cover `use` removed (one `remove_expert` pass each, into `scratch`).

    Without `use`, every expert must carry a consent record (the release's card then states what
    each may be used for) unless `allow_unrecorded`. Returns (the directory to export, the removed
    experts as owner/domain)."""
    from flexmoe.flex.consent import consent_mask
    from flexmoe.io.model_dir import read_model_meta

    src = Path(src)
    experts = read_model_meta(src).get("experts") or []
    owners = list(enumerate(experts))[1:]  # slot 0 is the public model's FFN: always shipped
    if not owners:
        return src, []
    if use is None:
        unrecorded = [f"{e.get('owner')}/{e.get('domain')}" for _, e in owners if not e.get("consent")]
        if unrecorded and not allow_unrecorded:
            raise CheckpointError(
                f"{src / META}: expert(s) {', '.join(unrecorded)} carry no consent record, so a release cannot say "
                "what they may be used for; export with --use USE (drops experts not consenting to it), re-package "
                "them with --allowed-uses, or pass --allow-unrecorded-consent")
        return src, []
    covered = consent_mask(experts, use, today)
    drop = [e for j, e in owners if not bool(covered[j]) and not (allow_unrecorded and not e.get("consent"))]
    if len(drop) == len(owners):
        raise CheckpointError(f"{src / META}: no owner's expert consents to use={use} "
                              f"({', '.join(str(e.get('owner')) for _, e in owners)}); nothing to release but the "
                              "public model, which is its own export")
    current = src
    for n, e in enumerate(drop):
        nxt = scratch / f"step-{n}"
        # Domains are unique in a merge (merge refuses duplicates): the name that cannot be ambiguous.
        remove_expert(current, nxt, e["domain"], verify=verify if n == 0 else False)
        current = nxt
    return current, [f"{e.get('owner')}/{e.get('domain')}" for e in drop]
