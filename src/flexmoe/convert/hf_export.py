"""`flexmoe export-hf`: a native model directory -> a Hugging Face directory, streamed into shards.

The output loads with `transformers.AutoModelForCausalLM.from_pretrained` as FlexOlmoForCausalLM
(or Olmo2ForCausalLM when dense), with experts stored one tensor each, as published FlexOlmo
checkpoints are. flexmoe's own metadata (expert names, fingerprint) rides along in flexmoe.json and
what HF has no tensor for in flexmoe/ (see extras.py); transformers ignores both, `import-hf` reads them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexmoe.io.extras import write_extras
from flexmoe.convert.hf import hf_config
from flexmoe.convert.hf_doc import doc_release
from flexmoe.convert.model_card import model_card
from flexmoe.io.log import get_logger
from flexmoe.io.keys import key_pairs
from flexmoe.io.hf_dir import HF_CONFIG, INDEX, SINGLE, copy_tokenizer
from flexmoe.io.native import open_native, parse_size
from flexmoe.io.shards import plan_shards
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import CONFIG, META, WEIGHTS, CheckpointError, atomic_dir, refuse_overlap, write_json
from flexmoe.io.castwrite import out_dtype, out_nbytes, write_file
from flexmoe.io.stream import FilePool, LazyTensor
from flexmoe.io.keys import router_bias_key

log = get_logger(__name__)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(src: str | Path, dst: str | Path, *, max_shard_size: str | int = "5GB", dtype: str | None = None,
              overwrite: bool = False, verify: bool = True, use: str | None = None) -> Path:
    """Write the HF directory for the native model at `src` into `dst`.

    `dtype` (float32|bfloat16|float16) casts floating tensors; default keeps them as stored.
    Refuses router biases that change routing: FlexOlmo in transformers has no router bias.
    `verify` False skips the sha256 and tensor_sha256 checks of `src` (the caller ran them).
    `use`: the use the release was made for, stated in its model card (README.md).
    """
    src, limit = Path(src), parse_size(max_shard_size)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    cast = EXPORT_DTYPES.get(dtype) if dtype else None
    refuse_overlap(dst, [src], "DST")
    cfg, native, meta = open_native(src, verify=verify)
    if meta.get("experts") and cast is not None and any(t.dtype.is_floating_point and t.dtype != cast
                                                        for t in native.values()):
        # The experts' tensor_sha256 cover their stored bytes; import-hf binds the cast ones afresh.
        meta = dict(meta, experts=[{k: v for k, v in e.items() if k not in ("tensor_sha256", "tensor_sha256_format")}
                                   for e in meta.get("experts") or []])
    doc = doc_release(src, cfg)  # anchor_* merges: a release with its own modeling file (hf_doc.py)
    keep = set(doc.keys) if doc else set()  # tensors written as stored whatever --dtype says
    if cfg.is_moe and cfg.router_cosine_temp > 0:
        raise CheckpointError(f"{src / CONFIG}: model.router_cosine_temp={cfg.router_cosine_temp}, but Hugging Face "
                              "FlexOlmo routes by dot product; merge again without --router-cosine-temp")
    hf = _hf_tensors(cfg, native)
    shards = plan_shards([(k, out_nbytes(t, cast)) for k, t in hf.items()], limit) + (doc.add_tensors(hf, native) if doc else [])
    names = [SINGLE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(out_nbytes(t, None if k in keep else cast) for k, t in hf.items())
    dtype_name = str(out_dtype(hf["model.embed_tokens.weight"], cast)).removeprefix("torch.")
    with FilePool() as pool:
        _check_router_bias(src, cfg, native, pool)
        with atomic_dir(dst, overwrite=overwrite, flag="--overwrite") as tmp:
            progress = Progress(f"export-hf {src.name}", total)
            for name, keys in zip(names, shards):
                # HF directories record no sha256s, so the output is not hashed (a 2 GB model saves ~1.5 s).
                write_file(tmp / name, {k: hf[k] for k in keys}, pool, cast=None if set(keys) <= keep else cast,
                           metadata={"format": "pt"},
                           progress=progress, digest=False)
            if len(shards) > 1:
                write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted((k, n) for n, keys in zip(names, shards) for k in keys))})
            config = hf_config(cfg, torch_dtype=dtype_name)
            config["dtype"] = dtype_name  # transformers 5 reads `dtype`; `torch_dtype` kept for older readers
            if doc:
                config = doc.config(config, meta)
                doc.write_code(tmp)
            write_json(tmp / HF_CONFIG, config)
            write_json(tmp / "generation_config.json", {k: v for k, v in (
                ("_from_model_config", True), ("eos_token_id", cfg.eos_token_id), ("pad_token_id", cfg.pad_token_id))
                if v is not None})
            tok = _tokenizer_dir(src, meta)
            if tok is not None:
                copy_tokenizer(tok, tmp)
            elif _is_bytes(meta.get("tokenizer")):
                _write_byte_tokenizer(tmp, cfg.max_seq_len)
            carried = write_extras(src, tmp, native, meta, pool)
            (tmp / "README.md").write_text(model_card(cfg, meta, use=use, remote_code=doc is not None))
            write_json(tmp / META, {**{k: v for k, v in meta.items() if k not in ("files", "tokenizer", "router_embedding")},
                                    **carried})
            progress.finish(f"{len(hf)} tensors in {len(shards)} shard(s) -> {dst}")
    return Path(dst)


def _hf_tensors(cfg, native: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """HF key -> lazy tensor, ordered by position in the native weights (shard, then offset) so reading
    is sequential, and a sharded native model exports exactly as its single-file twin."""
    def position(p):
        first = native[p[0]].spans[0]
        return first.path.name, first.start, p[1] or 0
    return {hf: native[nat] if slot is None else native[nat][slot] for nat, slot, hf in sorted(key_pairs(cfg), key=position)}


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


def _is_bytes(spec: Any) -> bool:
    return spec == "bytes" or (isinstance(spec, dict) and spec.get("type") == "bytes")


def _write_byte_tokenizer(tmp: Path, max_len: int) -> None:
    """The byte tokenizer as an HF tokenizer (data/tokenize.py), so `AutoTokenizer` loads the release."""
    from flexmoe.data.tokenize import write_hf_byte_tokenizer

    try:
        write_hf_byte_tokenizer(tmp, max_len)
    except ImportError:
        log.warning("no tokenizer written: the byte tokenizer's HF form needs the `tokenizers` package "
                    "(pip install tokenizers, or transformers)")


def _tokenizer_dir(src: Path, meta: dict[str, Any]) -> Path | None:
    spec = meta.get("tokenizer")
    path = spec.get("path") if isinstance(spec, dict) and spec.get("type") == "hf" else spec
    if not isinstance(path, str) or path == "bytes":
        return None
    for cand in (src / path, Path(path)):  # relative paths are relative to the model directory first
        if cand.is_dir():
            return cand
    return None

