"""Reading and checking the `manifest.json` that `prepare_data` writes next to its shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexmoe.data.errors import DataError
from flexmoe.io.files import sha256_file

FORMAT = "flexmoe-tokens/1"
MANIFEST_NAME = "manifest.json"

# (resolved path, mtime_ns, size) -> sha256: lets every rank and every reload of the same data
# skip rehashing gigabytes; any rewrite of a shard changes the key and forces a fresh hash.
_HASHES: dict[tuple[str, int, int], str] = {}


def load_manifest(data_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read `data_dir/manifest.json`; check every shard exists and, with `verify`, its sha256."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run prepare-data to build {data_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run prepare-data") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format {found!r} is not {FORMAT!r}; re-run prepare-data with this version")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{path}: lists no shards; re-run prepare-data")
    for shard in shards:
        shard_path = data_dir / shard["path"]
        if not shard_path.is_file():
            raise DataError(f"{shard_path}: shard listed in {path} is missing; re-run prepare-data")
        if verify:
            actual = _cached_sha256(shard_path)
            if actual != shard["sha256"]:
                raise DataError(
                    f"{shard_path}: sha256 mismatch (manifest says {shard['sha256']}, file has {actual}); re-run prepare-data"
                )
    return manifest


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    digest = _HASHES.get(key)
    if digest is None:
        digest = _HASHES[key] = sha256_file(path)
    return digest
