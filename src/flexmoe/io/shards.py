"""The weights of a native model directory: one `model.safetensors`, or shards named as Hugging Face
names them (`model-00001-of-000NN.safetensors`) listed in `model.safetensors.index.json`.

Both layouts read the same: `read_weights` gives every tensor as a lazy tensor (byte spans), after
checking the index against the shards both ways (every key it places is in that shard, every
tensor of a shard is listed, every shard is named in order and exists, none is left over).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flexmoe.io.errors import CheckpointError
from flexmoe.io.stream import LazyTensor, read_header

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def shard_names(count: int) -> list[str]:
    """File names of `count` shards: the single-file name when there is one."""
    if count == 1:
        return [WEIGHTS]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def is_weight_file(name: str) -> bool:
    """True for `model.safetensors`, a shard name and the index."""
    return name in (WEIGHTS, INDEX) or bool(_SHARD.match(name))


def plan_shards(sizes: list[tuple[str, int]], limit: int | None) -> list[list[str]]:
    """Greedy, in order: a shard takes tensors until the next would pass `limit` bytes (a tensor larger
    than `limit` gets a shard of its own); one shard without a limit."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def index_record(names: list[str], shards: list[list[str]], total: int) -> dict[str, Any]:
    """The index's JSON: total bytes of tensor data and which shard holds each tensor."""
    return {"metadata": {"total_size": total},
            "weight_map": dict(sorted((k, n) for n, keys in zip(names, shards) for k in keys))}


def weight_layout(src: Path) -> list[str]:
    """Names of the weight files of directory `src` (index first when sharded); refuses a directory
    that holds both layouts or neither."""
    single, index = (src / WEIGHTS).exists(), (src / INDEX).exists()
    if single and index:
        raise CheckpointError(f"{src}: holds both {WEIGHTS} and {INDEX}; a model has one layout (remove the "
                              "one that is not listed in flexmoe.json)")
    if index:
        return [INDEX, *_index_shards(src, _read_index(src))]
    if not single:
        raise CheckpointError(f"{src / WEIGHTS}: missing (and no {INDEX})")
    return [WEIGHTS]


def _read_index(src: Path) -> dict[str, str]:
    f = src / INDEX
    if f.is_symlink() or not f.is_file():
        raise CheckpointError(f"{f}: not a plain file")
    try:
        index = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); write the model again") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{f}: field 'weight_map' must map every tensor to its shard; write the model again")
    return weight_map


def _index_shards(src: Path, weight_map: dict[str, str]) -> list[str]:
    """The shards the index names, in order; they must be exactly model-00001-of-N ... N-of-N."""
    named = sorted(set(weight_map.values()))
    bad = next((n for n in named if not _SHARD.match(n)), None)
    if bad is not None:
        raise CheckpointError(f"{src / INDEX}: names shard {bad!r}; native shards are model-NNNNN-of-NNNNN.safetensors "
                              "in the model directory")
    want = shard_names(len(named)) if len(named) > 1 else None
    if want != named:
        raise CheckpointError(f"{src / INDEX}: names shards {named[:3]}{'...' if len(named) > 3 else ''}, not "
                              f"model-00001-of-N ... model-N-of-N; a shard is missing or the index is not this model's")
    left = sorted(p.name for p in src.iterdir() if _SHARD.match(p.name) and p.name not in named)
    if left:
        raise CheckpointError(f"{src / left[0]}: a shard the index does not name; the index and the shards do not "
                              "belong together")
    return named


def read_weights(src: Path) -> dict[str, LazyTensor]:
    """Every tensor of the model directory `src`, lazily, from either layout (index checked both ways)."""
    names = weight_layout(src)
    if names == [WEIGHTS]:
        return read_header(src / WEIGHTS)[0]
    weight_map = _read_index(src)
    return join_index(src, weight_map, {name: read_header(src / name)[0] for name in names[1:]})


def join_index(src: Path, weight_map: dict[str, str], shards: dict[str, dict[str, LazyTensor]]) -> dict[str, LazyTensor]:
    """{key: tensor} of an index's `weight_map` over the shards' headers, checked both ways: every
    tensor the index places is in its shard, and every tensor of a shard is in the index there."""
    for key, name in weight_map.items():
        if key not in shards[name]:
            raise CheckpointError(f"{src / name}: lacks tensor {key}, which {INDEX} places there; the index and the "
                                  "shards do not belong together")
    for name, tensors in shards.items():
        for key in tensors:
            if weight_map.get(key) != name:
                raise CheckpointError(f"{src / INDEX}: has no entry for tensor {key} of {name}; the index and the "
                                      "shards do not belong together")
    return {k: shards[n][k] for k, n in weight_map.items()}
