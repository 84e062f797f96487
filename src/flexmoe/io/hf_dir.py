"""Open a Hugging Face Olmo2 / FlexOlmo directory as lazy tensors, checking it fully before any copy.

Checked up front, each refusal naming the file at fault: the architecture, that weights are
safetensors (pickles are refused, never opened), that index and shards agree both ways, that
no shard is truncated, and that every tensor the config implies is present with its shape.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import HF_FUSED_KEY as _FUSED, hf_shapes, key_pairs
from flexmoe.io.model_dir import TOKENIZER_FILES, CheckpointError, read_json  # noqa: F401  (re-exported)
from flexmoe.io.schema import HF_CONFIG as HF_CONFIG_SCHEMA, HF_META, check, read_record
from flexmoe.io.shards import join_index
from flexmoe.io.stream import LazyTensor, read_header, stack

INDEX, SINGLE, HF_CONFIG = "model.safetensors.index.json", "model.safetensors", "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class HFCheckpoint:
    path: Path
    hf_config: dict[str, Any]
    cfg: ModelConfig
    tensors: dict[str, LazyTensor]  # HF per-expert key -> bytes on disk

    @property
    def architecture(self) -> str:
        return self.hf_config["architectures"][0]

    def native(self) -> dict[str, LazyTensor]:
        """The native state dict (experts stacked `[E, ...]`), lazily, in sorted key order."""
        out: dict[str, LazyTensor] = {}
        stacks: dict[str, list[LazyTensor]] = {}
        for nat, slot, hf in key_pairs(self.cfg):
            if slot is None:
                out[nat] = self.tensors[hf]
            else:
                stacks.setdefault(nat, []).append(self.tensors[hf])
        out.update({k: stack(v) for k, v in stacks.items()})
        return dict(sorted(out.items()))


def hf_architecture(path: str | Path) -> str | None:
    """The `architectures[0]` of an HF directory's config.json; None for native or package directories."""
    f = Path(path) / HF_CONFIG
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or not ("architectures" in cfg or "model_type" in cfg):
        return None  # a native config.json (ModelConfig fields)
    return (cfg.get("architectures") or [str(cfg.get("model_type"))])[0]


def open_hf_dir(path: str | Path) -> HFCheckpoint:
    """Read config and safetensors headers of an HF directory; refuse anything inconsistent."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    hf = read_json(path / HF_CONFIG)
    if hf_architecture(path) is None and (path / "flexmoe.json").is_file():
        raise CheckpointError(f"{path / HF_CONFIG}: is a native flexmoe config, not a Hugging Face one; "
                              "this directory needs no import (export-hf converts the other way)")
    check(hf, HF_CONFIG_SCHEMA, path / HF_CONFIG)
    try:
        cfg = config_from_hf(hf, source=str(path / HF_CONFIG))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / HF_CONFIG}: missing or malformed field {e}") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    tensors, where = _weights(path)
    # Older saves may hold RoPE's inverse frequencies; they follow from the config, so drop them.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    tensors = _unfuse(tensors, cfg, where)
    if "lm_head.weight" not in tensors and hf.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied head: exported untied
    shapes = hf_shapes(cfg)
    for key, shape in shapes.items():
        t = tensors.get(key)
        if t is None:
            _unlisted(path, where, key)
            raise CheckpointError(f"{where}: has no tensor {key}, which {path / HF_CONFIG} implies "
                                  f"({cfg.num_layers} layers, {cfg.num_experts} experts); the weights and config do not match")
        if t.shape != shape:
            raise CheckpointError(f"{t.path}: {key} has shape {list(t.shape)}, {path / HF_CONFIG} implies {list(shape)}; "
                                  "the weights and config do not match")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise CheckpointError(f"{tensors[extra[0]].path}: unexpected tensor {extra[0]} for a {hf['architectures'][0]} "
                              f"as {path / HF_CONFIG} describes it ({len(extra)} unexpected in all)")
    return HFCheckpoint(path, hf, cfg, {k: tensors[k] for k in shapes})


def _weights(path: Path) -> tuple[dict[str, LazyTensor], Path]:
    """All tensors of the directory (index + shards, or one file) and the file that lists them."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX}: has no weight_map; regenerate the index")
        for name in set(weight_map.values()):
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{path / INDEX}: names shard {name!r}; shards must be .safetensors files "
                                      "in the same directory")
        shards = {name: read_header(path / name)[0] for name in sorted(set(weight_map.values()))}
        return join_index(path, weight_map, shards), path / INDEX
    if (path / SINGLE).is_file():
        return read_header(path / SINGLE)[0], path / SINGLE
    pickles = sorted(p for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES) or p.name.endswith(".bin.index.json"))
    if pickles:
        raise CheckpointError(f"{pickles[0]}: PyTorch pickle weights are refused (loading a pickle can run any code); "
                              "ask for a safetensors export, or re-save it with safe_serialization in a sandbox")
    raise CheckpointError(f"{path}: has neither {SINGLE} nor {INDEX}")


def _unlisted(path: Path, index: Path, key: str) -> None:
    """A tensor the index lacks may sit in a shard the index never names: say so, naming the index."""
    if index.name != INDEX:
        return
    listed = set(read_json(index)["weight_map"].values())
    for f in sorted(path.glob("*.safetensors")):
        if f.name not in listed and key in read_header(f)[0]:
            raise CheckpointError(f"{index}: has no entry for tensor {key} of {f.name}; "
                                  "the index and the shards do not belong together")


def _unfuse(tensors: dict[str, LazyTensor], cfg: ModelConfig, where: Path) -> dict[str, LazyTensor]:
    """transformers-5 fused expert tensors (`experts.gate_up_proj [E, 2F, D]`) -> per-expert keys, lazily."""
    out = {}
    for key, t in tensors.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = t
            continue
        prefix, kind = m.groups()
        E, F, D = cfg.num_experts, cfg.d_ff, cfg.d_model
        want = (E, 2 * F, D) if kind == "gate_up_proj" else (E, D, F)
        if t.shape != want:
            raise CheckpointError(f"{t.path}: {key} has shape {list(t.shape)}, the config implies {list(want)}")
        for j in range(E):
            if kind == "gate_up_proj":
                # gate rows come first in each expert's fused block
                out[f"{prefix}.{j}.gate_proj.weight"] = t[j].rows(0, F)
                out[f"{prefix}.{j}.up_proj.weight"] = t[j].rows(F, 2 * F)
            else:
                out[f"{prefix}.{j}.down_proj.weight"] = t[j]
    return out


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in `src` into `dst` (created if any); returns their names."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy2(src / n, dst / n)
    return names


def expert_names(path: Path, num_experts: int) -> list[dict[str, Any]]:
    """`experts` entries [{slot, owner, domain}] as the directory names them (see `listed_expert_names`),
    else slot 0 "public" (FlexOlmo's convention: slot 0 is the public model) and `expert{j}`."""
    named = listed_expert_names(path, num_experts)
    if named:
        return named
    return [{"slot": j, "owner": "public" if j == 0 else f"expert{j}", "domain": "public" if j == 0 else f"expert{j}"}
            for j in range(num_experts)]


def listed_expert_names(path: Path, num_experts: int) -> list[dict[str, Any]] | None:
    """Expert names from the directory's flexmoe.json (written by export-hf), else from README.md front
    matter (`owner:` / `domain:` lines name slot 1 of a 2-expert anchor); None when neither names them."""
    meta_file = path / "flexmoe.json"
    if meta_file.exists():
        listed = read_record(meta_file, HF_META).get("experts") or []
        if len(listed) == num_experts and all("owner" in e and "domain" in e for e in listed):
            return [dict(e, slot=j) for j, e in enumerate(listed)]
    readme = path / "README.md"
    if num_experts == 2 and readme.is_file():
        parts = readme.read_text(errors="replace").split("---")
        if len(parts) >= 3 and not parts[0].strip():
            fields = dict(line.split(":", 1) for line in parts[1].splitlines() if ":" in line)
            fields = {k.strip(): v.strip().strip("'\"") for k, v in fields.items()}
            owner = fields.get("owner") or fields.get("domain")
            if owner:
                return [{"slot": 0, "owner": "public", "domain": "public"},
                        {"slot": 1, "owner": owner, "domain": fields.get("domain") or owner}]
    return None


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """`config.json` of an Olmo2 or FlexOlmo checkpoint -> ModelConfig; other architectures refused."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ("Olmo2ForCausalLM", "FlexOlmoForCausalLM"):
        raise ValueError(f"{source}: architecture {arch!r} is not supported (Olmo2ForCausalLM, FlexOlmoForCausalLM)")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"{source}: only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    moe = arch == "FlexOlmoForCausalLM"
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        num_experts=hf.get("num_experts", 0) if moe else 0,
        top_k=hf.get("num_experts_per_tok", 2) if moe else 2,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        pad_token_id=hf.get("pad_token_id"),
        eos_token_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else None,
    )
