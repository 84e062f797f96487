"""`flexmoe export-hf`: a native model directory -> a Hugging Face directory, streamed into shards.

The output loads with `transformers.AutoModelForCausalLM.from_pretrained` as FlexOlmoForCausalLM
(or Olmo2ForCausalLM when dense), with experts stored one tensor each, as published FlexOlmo
checkpoints are. flexmoe's own metadata (expert names, fingerprint) rides along in flexmoe.json and
what HF has no tensor for in flexmoe/ (see extras.py); transformers ignores both, `import-hf` reads them back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from flexmoe.io.extras import write_extras
from flexmoe.convert.hf import hf_config
from flexmoe.io.keys import key_pairs
from flexmoe.io.hf_dir import HF_CONFIG, INDEX, SINGLE, copy_tokenizer
from flexmoe.io.native import open_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import CONFIG, META, WEIGHTS, CheckpointError, atomic_dir, write_json
from flexmoe.io.stream import FilePool, LazyTensor, out_dtype, out_nbytes, write_file
from flexmoe.io.keys import router_bias_key

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' (decimal, as Hugging Face counts), '500MiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export_hf(src: str | Path, dst: str | Path, *, max_shard_size: str | int = "5GB", dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write the HF directory for the native model at `src` into `dst`.

    `dtype` (float32|bfloat16|float16) casts floating tensors; default keeps them as stored.
    Refuses router biases that change routing: FlexOlmo in transformers has no router bias.
    """
    src, limit = Path(src), parse_size(max_shard_size)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    cast = EXPORT_DTYPES.get(dtype) if dtype else None
    cfg, native, meta = open_native(src)
    routing = getattr(cfg, "routing", "topk")
    if cfg.is_moe and routing != "topk":
        raise CheckpointError(f"{src / CONFIG}: model.routing={routing!r}, but Hugging Face FlexOlmo only routes "
                              "top-k, so the export would compute something else; merge again with top-k routing")
    if cfg.is_moe and cfg.router_cosine_temp > 0:
        raise CheckpointError(f"{src / CONFIG}: model.router_cosine_temp={cfg.router_cosine_temp}, but Hugging Face "
                              "FlexOlmo routes by dot product; merge again without --router-cosine-temp")
    hf = _hf_tensors(cfg, native)
    shards = _plan_shards(hf, cast, limit)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(out_nbytes(t, cast) for t in hf.values())
    dtype_name = str(out_dtype(hf["model.embed_tokens.weight"], cast)).removeprefix("torch.")
    with FilePool() as pool:
        _check_router_bias(src, cfg, native, pool)
        with atomic_dir(dst, overwrite=overwrite) as tmp:
            progress = Progress(f"export-hf {src.name}", total)
            for name, keys in zip(names, shards):
                # HF directories record no sha256s, so the output is not hashed (a 2 GB model saves ~1.5 s).
                write_file(tmp / name, {k: hf[k] for k in keys}, pool, cast=cast, metadata={"format": "pt"},
                           progress=progress, digest=False)
            if len(shards) > 1:
                write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted((k, n) for n, keys in zip(names, shards) for k in keys))})
            config = hf_config(cfg, torch_dtype=dtype_name)
            config["dtype"] = dtype_name  # transformers 5 reads `dtype`; `torch_dtype` kept for older readers
            write_json(tmp / HF_CONFIG, config)
            write_json(tmp / "generation_config.json", {k: v for k, v in (
                ("_from_model_config", True), ("eos_token_id", cfg.eos_token_id), ("pad_token_id", cfg.pad_token_id))
                if v is not None})
            tok = _tokenizer_dir(src, meta)
            if tok is not None:
                copy_tokenizer(tok, tmp)
            carried = write_extras(src, tmp, native, meta, pool)
            write_json(tmp / META, {**{k: v for k, v in meta.items() if k not in ("files", "tokenizer", "router_embedding")},
                                    **carried})
            progress.finish(f"{len(hf)} tensors in {len(shards)} shard(s) -> {dst}")
    return Path(dst)


def _hf_tensors(cfg, native: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """HF key -> lazy tensor, ordered by position in the native file so reading is sequential."""
    pairs = sorted(key_pairs(cfg), key=lambda p: (native[p[0]].spans[0].start, p[1] or 0))
    return {hf: native[nat] if slot is None else native[nat][slot] for nat, slot, hf in pairs}


def _plan_shards(hf: dict[str, LazyTensor], cast, limit: int) -> list[list[str]]:
    """Greedy: a shard takes tensors in order until the next would pass `limit` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in hf.items():
        n = out_nbytes(t, cast)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _check_router_bias(src: Path, cfg, native: dict[str, LazyTensor], pool: FilePool) -> None:
    if not (cfg.is_moe and cfg.router_bias):
        return
    for i in range(cfg.num_layers):
        b = pool.read(native[router_bias_key(i)]).float()
        # What the router adds (model/moe.py): clamped to <= 0 and 0 for the anchor.
        applied = torch.cat([b.new_zeros(1), b[1:].clamp(max=0)])
        if bool(applied.ne(0).any()):
            raise CheckpointError(f"{src / WEIGHTS}: {router_bias_key(i)} is non-zero ({applied.tolist()}); "
                                  "Hugging Face FlexOlmo has no router bias, so the export would route differently; "
                                  "zero the biases (or fold them into a release without them) before export")


def _tokenizer_dir(src: Path, meta: dict[str, Any]) -> Path | None:
    spec = meta.get("tokenizer")
    path = spec.get("path") if isinstance(spec, dict) and spec.get("type") == "hf" else spec
    if not isinstance(path, str) or path == "bytes":
        return None
    for cand in (src / path, Path(path)):  # relative paths are relative to the model directory first
        if cand.is_dir():
            return cand
    return None

