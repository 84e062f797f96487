"""Bad inputs: each refused with one line naming the file at fault, nothing left at DST, nothing unpickled."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexmoe.convert.hf_export import export_hf
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from hfhelpers import edit_json, make_native, random_config, refuse

INDEX = "model.safetensors.index.json"


@pytest.fixture()
def sharded(tmp_path):
    """A 3-expert HF export in several shards."""
    native = make_native(tmp_path, random_config(11, moe=True, gqa=True).replace(num_experts=3, top_k=2))
    return export_hf(native, tmp_path / "hf", max_shard_size="10KB")


def _import(capsys, src, tmp_path):
    return refuse(capsys, ["import-hf", str(src), str(tmp_path / "dst")], tmp_path / "dst")


def _weight_map(src):
    return json.loads((src / INDEX).read_text())["weight_map"]


def test_index_names_a_shard_that_lacks_the_key(tmp_path, capsys, sharded):
    wm = _weight_map(sharded)
    key = "model.layers.0.self_attn.q_proj.weight"
    other = next(s for s in sorted(set(wm.values())) if s != wm[key])
    edit_json(sharded / INDEX, lambda ix: ix["weight_map"].__setitem__(key, other))
    err = _import(capsys, sharded, tmp_path)
    assert f"{sharded / other}: lacks tensor {key}" in err


@pytest.mark.parametrize("alone", [False, True])
def test_key_missing_from_the_index(tmp_path, capsys, sharded, alone):
    """The key's shard still holds other indexed keys, or (alone) the index no longer names it at all."""
    wm = _weight_map(sharded)
    count = {s: list(wm.values()).count(s) for s in wm.values()}
    key = next(k for k in sorted(wm) if (count[wm[k]] == 1) == alone)
    edit_json(sharded / INDEX, lambda ix: ix["weight_map"].pop(key))
    err = _import(capsys, sharded, tmp_path)
    assert f"{sharded / INDEX}: has no entry for tensor {key} of {wm[key]}" in err


def test_truncated_shard(tmp_path, capsys, sharded):
    shard = sharded / sorted(set(_weight_map(sharded).values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    err = _import(capsys, sharded, tmp_path)
    assert f"{shard}: truncated: the header needs {len(data)} bytes, the file has {len(data) - 100}" in err


def test_shape_mismatch(tmp_path, capsys, sharded):
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    shard = sharded / _weight_map(sharded)[key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key].t().contiguous()  # same bytes, transposed shape
    save_file(tensors, str(shard), metadata={"format": "pt"})
    err = _import(capsys, sharded, tmp_path)
    shape = list(tensors[key].shape)
    assert f"{shard}: {key} has shape {shape}, {sharded / 'config.json'} implies {shape[::-1]}" in err


def test_unknown_architecture(tmp_path, capsys, sharded):
    edit_json(sharded / "config.json", lambda c: c.__setitem__("architectures", ["LlamaForCausalLM"]))
    err = _import(capsys, sharded, tmp_path)
    assert f"{sharded / 'config.json'}: architecture 'LlamaForCausalLM' is not supported" in err


class _Boom:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_weights_are_refused_unopened(tmp_path, capsys, sharded, monkeypatch):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((sharded / "config.json").read_text())
    sentinel = tmp_path / "UNPICKLED"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(str(sentinel))}))

    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    err = _import(capsys, src, tmp_path)
    assert f"{src / 'pytorch_model.bin'}: PyTorch pickle weights are refused" in err
    assert not sentinel.exists()


def test_export_refuses_router_bias(tmp_path, capsys):
    cfg = random_config(4, moe=True, gqa=False).replace(router_bias=True)
    native = make_native(tmp_path, cfg)
    _, sd, meta = load_model_dir(native)
    for i in range(cfg.num_layers):
        sd[f"layers.{i}.ffn.router.bias"].zero_()
    sd["layers.0.ffn.router.bias"][1] = -0.5  # pushes expert 1 down: HF cannot route like that
    bad = save_model_dir(tmp_path / "biased", cfg, sd, meta)
    err = refuse(capsys, ["export-hf", str(bad), str(tmp_path / "out"), "--allow-unrecorded-consent"], tmp_path / "out")
    assert f"{bad / 'model.safetensors'}: layers.0.ffn.router.bias is non-zero" in err
    # a bias that routes nothing differently (anchor slot, or positive and so clamped away) exports
    sd["layers.0.ffn.router.bias"][:] = torch.tensor([-3.0] + [0.25] * (cfg.num_experts - 1))
    ok = save_model_dir(tmp_path / "harmless", cfg, sd, meta)
    assert (export_hf(ok, tmp_path / "out2") / "config.json").is_file()


def test_export_refuses_corrupted_native_file(tmp_path, capsys):
    native = make_native(tmp_path, random_config(1, moe=False, gqa=False))
    w = native / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10
    w.write_bytes(bytes(data))
    err = refuse(capsys, ["export-hf", str(native), str(tmp_path / "out")], tmp_path / "out")
    assert f"{w}: sha256 does not match" in err
