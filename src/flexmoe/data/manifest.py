"""Reading and checking the `manifest.json` that `prepare_data` writes next to its shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexmoe.data.errors import DataError
from flexmoe.io.files import sha256_file
from flexmoe.io.schema import Field, Record, check, relpath_rule, sha256_rule

FORMAT = "flexmoe-tokens/1"
SFT_FORMAT = "flexmoe-sft/1"
MANIFEST_NAME = "manifest.json"
SHARD_DTYPES = ("uint16", "uint32")
SFT_FILES = ("tokens.npy", "loss_mask.npy", "doc_starts.npy")
USER_IDS_NAME = "user_ids.npy"  # prepare-data --user-field: each document's user (privacy.unit=user)

# (resolved path, mtime_ns, size) -> sha256: lets every rank and every reload of the same data
# skip rehashing gigabytes; any rewrite of a shard changes the key and forces a fresh hash.
_HASHES: dict[tuple[str, int, int], str] = {}
# The same key -> the largest token id in the shard (checked once against a model's vocabulary).
_MAX_IDS: dict[tuple[str, int, int], int] = {}


def _f(*types: type | None, required: bool = True, **kw: Any) -> Field:
    return Field(tuple(type(None) if t is None else t for t in types), required=required, **kw)


def _nonneg(v: int) -> str | None:
    return None if v >= 0 else f"is {v}, must be >= 0"


def _positive(v: int) -> str | None:
    return None if v > 0 else f"is {v}, must be > 0"


# What `tokenizer.spec()` writes; `hf` specs carry the path and the tokenizer.json sha256.
TOKENIZER = Record({
    "type": _f(str, choices=("bytes", "hf")),
    "vocab_size": _f(int, required=False, rule=_positive),
    "path": _f(str, required=False, rule=lambda v: None if v else "is empty"),
    "sha256": _f(str, None, required=False, rule=lambda v: None if v is None else sha256_rule(v)),
    "eos_id": _f(int, None, required=False, rule=lambda v: None if v is None else _nonneg(v)),
    "pad_id": _f(int, None, required=False, rule=lambda v: None if v is None else _nonneg(v)),
}, open=True)

SHARD = Record({
    "path": _f(str, rule=relpath_rule),
    "num_tokens": _f(int, rule=_nonneg),
    "sha256": _f(str, rule=sha256_rule),
})

# prepare-data --user-field: which field named the users, how many there are, and the file of
# dense per-document ids (0..num_users-1, in stream order)
USERS = Record({
    "field": _f(str, rule=lambda v: None if v else "is empty"),
    "num_users": _f(int, rule=_positive),
    "path": _f(str, rule=relpath_rule),
    "sha256": _f(str, rule=sha256_rule),
})

TOKENS_MANIFEST = Record({
    "format": _f(str, choices=(FORMAT,), version=True),
    "domain": _f(str, None, required=False),
    "tokenizer": _f(dict, record=TOKENIZER),
    "dtype": _f(str, choices=SHARD_DTYPES),
    "num_tokens": _f(int, rule=_nonneg),
    "num_documents": _f(int, required=False, rule=_nonneg),
    "append_eos": _f(bool, required=False),
    "eos_id": _f(int, None, required=False, rule=lambda v: None if v is None else _nonneg(v)),
    "shards": _f(list, items=SHARD, rule=lambda v: None if v else "is empty: a prepared directory has shards"),
    "sources": _f(list, required=False),
    "users": _f(dict, required=False, record=USERS),
}, open=True)

SFT_MANIFEST = Record({
    "format": _f(str, choices=(SFT_FORMAT,), version=True),
    "tokenizer": _f(dict, record=TOKENIZER),
    "num_tokens": _f(int, rule=_nonneg),
    "num_examples": _f(int, rule=_nonneg),
    "num_trained_tokens": _f(int, rule=_nonneg),
    "files": _f(dict, values=_f(str, rule=sha256_rule),
                rule=lambda v: None if sorted(v) == sorted(SFT_FILES) else f"must list exactly {', '.join(SFT_FILES)}"),
}, open=True)


def read_manifest_record(data_dir: str | Path, formats: tuple[str, ...] = (FORMAT,)) -> dict[str, Any]:
    """`data_dir/manifest.json` parsed and checked against its schema (types, values, version)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory; pass a directory made by `flexmoe prepare-data`")
    if path.is_symlink():
        raise DataError(f"{path}: a link; a prepared directory holds its own manifest (re-run prepare-data)")
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run prepare-data to build {data_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run prepare-data") from e
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found not in formats:
        kinds = " or ".join(repr(f) for f in formats)
        raise DataError(f"{path}: format {found!r} is not {kinds}; re-run prepare-data with this version")
    check(manifest, TOKENS_MANIFEST if found == FORMAT else SFT_MANIFEST, path, DataError)
    return manifest


def member_path(data_dir: Path, name: str, listed_in: Path) -> Path:
    """`data_dir / name`, refused when it is a link or resolves outside `data_dir`."""
    path = data_dir / name
    if path.is_symlink() or not path.resolve().is_relative_to(data_dir.resolve()):
        raise DataError(f"{path}: listed in {listed_in} but a link or outside {data_dir}; "
                        "a prepared directory holds only its own plain files (re-run prepare-data)")
    return path


def load_manifest(data_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read `data_dir/manifest.json`; check its schema, that every shard is a plain file inside
    `data_dir` and, with `verify`, its sha256."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    manifest = read_manifest_record(data_dir)
    shards = manifest["shards"]
    names = [shard["path"] for shard in shards]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: lists a shard twice; re-run prepare-data")
    if sum(shard["num_tokens"] for shard in shards) != manifest["num_tokens"]:
        raise DataError(f"{path}: field 'num_tokens' is {manifest['num_tokens']}, but the shards hold "
                        f"{sum(shard['num_tokens'] for shard in shards)}; re-run prepare-data")
    for shard in shards:
        shard_path = member_path(data_dir, shard["path"], path)
        if not shard_path.is_file():
            raise DataError(f"{shard_path}: shard listed in {path} is missing; re-run prepare-data")
        if verify:
            actual = _cached_sha256(shard_path)
            if actual != shard["sha256"]:
                raise DataError(
                    f"{shard_path}: sha256 mismatch (manifest says {shard['sha256']}, file has {actual}); re-run prepare-data"
                )
    return manifest


def load_user_ids(data_dir: str | Path, manifest: dict[str, Any], *, verify: bool = True):
    """The per-document user ids `prepare-data --user-field` wrote (an int64 array of
    `num_documents` ids in 0..num_users-1), checked against the manifest's `users` record;
    None when the directory was prepared without user ids."""
    import numpy as np

    users = manifest.get("users")
    if users is None:
        return None
    data_dir = Path(data_dir)
    listed_in = data_dir / MANIFEST_NAME
    path = member_path(data_dir, users["path"], listed_in)
    if not path.is_file():
        raise DataError(f"{path}: user ids listed in {listed_in} are missing; re-run prepare-data")
    if verify and _cached_sha256(path) != users["sha256"]:
        raise DataError(f"{path}: sha256 mismatch with {listed_in}; re-run prepare-data")
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable user ids ({e}); re-run prepare-data") from e
    n, u = manifest.get("num_documents"), users["num_users"]
    if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != n or (len(ids) and (ids.min() < 0 or ids.max() >= u)):
        raise DataError(f"{path}: holds {ids.shape} {ids.dtype} ids, the manifest says {n} documents of {u} users; "
                        "re-run prepare-data")
    return ids


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _cached_sha256(path: Path) -> str:
    key = _key(path)
    digest = _HASHES.get(key)
    if digest is None:
        digest = _HASHES[key] = sha256_file(path)
    return digest


def max_token_id(path: Path, tokens) -> int:
    """The largest id in `tokens` (the array loaded from `path`), computed once per file version."""
    key = _key(path)
    found = _MAX_IDS.get(key)
    if found is None:
        found = _MAX_IDS[key] = int(tokens.max()) if len(tokens) else -1
    return found
