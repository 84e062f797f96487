"""Merged and native model directories, consent records in them, and Hugging Face directories given
to merge or import-hf (issue 13): every reader verifies file sha256s and each expert's
tensor_sha256, checks flexmoe.json against its schema, and refuses with exit code 2, one line
naming the file (and field), no traceback, nothing at the destination.

Each case copies one valid model built once per module, applies one forger's mutation (file
sha256s rewritten, so only the deeper checks can catch it) and runs one command in-process.
"""

from __future__ import annotations

import json

import pytest
import torch
from security_harness import assert_refused, snapshot
from pkgworld import (CONFIG, META, WEIGHTS, build_world, copy, edit_hf_tensors, edit_json, edit_model_tensors,
                      rehash_model, write_pickle_bomb)

from flexmoe.io.keys import EXPERT_WEIGHTS, experts_key, hf_experts_prefix, router_bias_key, router_weight_key


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("model-inputs"))


def _argv(cmd: str, model, tmp_path) -> tuple[list, object]:
    """(argv, destination or None) of `cmd` reading `model`."""
    out = tmp_path / "out"
    return {
        "remove-expert": (["remove-expert", model, out, "--expert", "code"], out),
        "export-hf": (["export-hf", model, out], out),
        "eval": (["eval", model, "--data", f"x={tmp_path / 'no-data'}"], None),
        "consent": (["consent", model], None),
        "generate": (["generate", model, "--prompt", "0123", "--max-new-tokens", "1", "--tokenizer", "bytes"], None),
        "generate-use": (["generate", model, "--prompt", "0123", "--max-new-tokens", "1", "--tokenizer", "bytes",
                          "--use", "research"], None),
    }[cmd]


def _swap_slots(sd):
    """code's expert, router rows and routing centroid moved into math's slot and back (the file
    sha256s are rewritten after): only the per-expert tensor_sha256 can tell."""
    for i in range(2):
        for key in [experts_key(i, n) for n in EXPERT_WEIGHTS] + [router_weight_key(i)]:
            sd[key][[1, 2]] = sd[key][[2, 1]].clone()
    sd["domain_centroids"][[1, 2]] = sd["domain_centroids"][[2, 1]].clone()


def _nudge(sd):
    sd[experts_key(1, "down_proj")][2, 0, 0] += 1e-3


def _meta(fn):
    return lambda m: edit_json(m / META, fn)


def _expert(j, fn):
    return _meta(lambda meta: fn(meta["experts"][j]))


def _swap_records(meta):
    e = meta["experts"]
    for key in ("consent", "tensor_sha256"):
        e[1][key], e[2][key] = e[2][key], e[1][key]


def _biased(m):
    """A router bias of the wrong shape, with config.json claiming a bias (both rehashed)."""
    edit_model_tensors(m, lambda sd: sd.update({router_bias_key(0): torch.zeros(2), router_bias_key(1): torch.zeros(3)}))
    edit_json(m / CONFIG, lambda c: c.update(router_bias=True))
    rehash_model(m)


def _truncate(m):
    (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:-64])
    rehash_model(m)


def _pickle(m):
    write_pickle_bomb(m / WEIGHTS, m.parent / "canary")
    rehash_model(m)


def _link_weights(m):
    (m / WEIGHTS).rename(m.parent / "w.safetensors")
    (m / WEIGHTS).symlink_to(m.parent / "w.safetensors")


# id: (mutation of a copy of the 3-expert merged model, command, file it must name, text the line must hold)
MODEL_CASES = {
    # issue 13, unsafe 3: slots swapped, file hashes rewritten; every reader refuses
    "swapped-remove-expert": (lambda m: edit_model_tensors(m, _swap_slots), "remove-expert", META, "tensor_sha256"),
    "swapped-export-hf": (lambda m: edit_model_tensors(m, _swap_slots), "export-hf", META, "tensor_sha256"),
    "swapped-eval": (lambda m: edit_model_tensors(m, _swap_slots), "eval", META, "tensor_sha256"),
    "swapped-consent": (lambda m: edit_model_tensors(m, _swap_slots), "consent", META, "tensor_sha256"),
    "swapped-generate": (lambda m: edit_model_tensors(m, _swap_slots), "generate", META, "tensor_sha256"),
    "nudged-remove-expert": (lambda m: edit_model_tensors(m, _nudge), "remove-expert", META, "slot 2"),
    "records-swapped": (_meta(_swap_records), "generate-use", META, "slot 1"),
    "hash-deleted": (_expert(2, lambda e: e.pop("tensor_sha256")), "eval", META, "experts[2].tensor_sha256"),
    "hash-not-hex": (_expert(1, lambda e: e.update(tensor_sha256="zz")), "consent", META, "experts[1].tensor_sha256"),
    # consent records inside the model
    "consent-uses-string": (_expert(1, lambda e: e["consent"].update(allowed_uses="noncommercial")), "generate-use",
                            META, "experts[1].consent.allowed_uses"),
    "consent-expires-words": (_expert(2, lambda e: e["consent"].update(expires="soon")), "consent", META,
                              "experts[2].consent.expires"),
    "dp-epsilon-string": (_expert(2, lambda e: e.update(dp={"epsilon": "low"})), "consent", META, "experts[2].dp"),
    "expert-named-public": (_expert(1, lambda e: e.update(owner="public")), "remove-expert", META, "experts[1]"),
    "expert-slot-wrong": (_expert(1, lambda e: e.update(slot=5)), "export-hf", META, "experts[1].slot"),
    "expert-owner-missing": (_expert(2, lambda e: e.pop("owner")), "eval", META, "experts[2]"),
    "experts-dict": (_meta(lambda meta: meta.update(experts={"1": "code"})), "consent", META, "experts"),
    "experts-one-short": (_meta(lambda meta: meta["experts"].pop()), "generate-use", META, "lists 2 experts"),
    # the metadata file itself
    "meta-missing": (lambda m: (m / META).unlink(), "eval", META, "missing"),
    "meta-format-9": (_meta(lambda meta: meta.update(format="flexmoe-model/9")), "generate", META, "format"),
    "meta-kind-unknown": (_meta(lambda meta: meta.update(kind="mixture")), "eval", META, "kind"),
    "files-empty": (_meta(lambda meta: meta.update(files={})), "export-hf", META, "files"),
    "files-outside": (_meta(lambda meta: meta["files"].update({"../public/" + WEIGHTS: "0" * 64})), "consent", META,
                      "files"),
    "weights-symlink": (_link_weights, "remove-expert", WEIGHTS, "link"),
    # the weights
    "router-bias-wrong-shape": (_biased, "export-hf", WEIGHTS, "shape"),
    "weights-truncated": (_truncate, "remove-expert", WEIGHTS, "truncated"),
    "weights-pickle": (_pickle, "eval", WEIGHTS, "safetensors"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_malformed_merged_model_is_refused(case, w, tmp_path, run_cli):
    mutate, cmd, where, text = MODEL_CASES[case]
    model = copy(w["merged"], tmp_path / "merged")
    mutate(model)
    argv, dest = _argv(cmd, model, tmp_path)
    r = run_cli(argv)
    assert_refused(r, str(model / where), dest)
    assert text in r.last_line, r.last_line
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


@pytest.mark.parametrize("cmd", ["remove-expert", "export-hf", "consent", "generate"])
def test_valid_merged_model_is_read(cmd, w, tmp_path, run_cli):
    """The baseline the cases mutate passes every reader."""
    argv, dest = _argv(cmd, copy(w["merged"], tmp_path / "merged"), tmp_path)
    r = run_cli(argv)
    assert r.rc == 0, r.err


def test_only_the_tensor_hashes_catch_a_swap(w, tmp_path, run_cli):
    """The swapped model above passes every other check: with --no-verify (said on stderr) the
    release named 'without code' is written, and holds code's weights. By default it is refused."""
    model = copy(w["merged"], tmp_path / "merged")
    edit_model_tensors(model, _swap_slots)
    r = run_cli(["remove-expert", model, tmp_path / "out", "--expert", "code", "--no-verify"])
    assert r.rc == 0 and "--no-verify" in r.err, r.err
    assert "checks skipped" in r.err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_overlapping_the_input_is_refused(where, w, tmp_path, run_cli):
    model = copy(w["merged"], tmp_path / "merged")
    dst = model if where == "same" else model / "release"
    before = snapshot(dst)
    for argv in (["remove-expert", model, dst, "--expert", "code", "--overwrite"], ["export-hf", model, dst]):
        r = run_cli(argv)
        assert_refused(r, [str(dst), "DST"], dst, before)
    assert snapshot(model) == snapshot(w["merged"]) or where == "inside"


def test_anchor_without_metadata_cannot_be_packaged(w, tmp_path, run_cli):
    anchor = copy(w["root"] / "trained-code", tmp_path / "trained")
    (anchor / META).unlink()
    r = run_cli(["package", anchor, tmp_path / "pkg", "--owner", "o", "--domain", "d"])
    assert_refused(r, str(anchor / META), tmp_path / "pkg")


# --- Hugging Face directories given to merge and import-hf ---------------------------------------

UP1 = f"{hf_experts_prefix(0)}.1.up_proj.weight"  # expert 1's up_proj in layer 0, as HF names it


def _hf_nudge(sd):
    sd[UP1][0, 0] += 1e-3


def _hf_nan(h):
    edit_hf_tensors(h, lambda sd: sd[UP1].view(-1).__setitem__(0, float("nan")))
    edit_json(h / META, lambda m: [e.pop("tensor_sha256", None) for e in m["experts"]])


def _hf_pickle(h):
    (h / WEIGHTS).unlink()
    write_pickle_bomb(h / "pytorch_model.bin", h.parent / "canary")


def _hf_index_outside(h):
    (h / WEIGHTS).rename(h.parent / "shard.safetensors")
    from safetensors import safe_open
    with safe_open(str(h.parent / "shard.safetensors"), "pt") as f:
        keys = list(f.keys())
    (h / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../shard.safetensors" for k in keys}}))


# id: (mutation of a copy of the HF 2-expert checkpoint, command, file it must name, text the line must hold)
HF_CASES = {
    "meta-experts-dict-merge": (lambda h: edit_json(h / META, lambda m: m.update(experts={"owner": "x"})), "merge",
                                META, "experts"),
    "meta-not-json-import": (lambda h: (h / META).write_text("{nope"), "import-hf", META, "JSON"),
    "meta-owner-public-merge": (lambda h: edit_json(h / META, lambda m: m["experts"][1].update(owner="public")),
                                "merge", "", "public"),
    "meta-uses-string-import": (lambda h: edit_json(h / META, lambda m: m["experts"][1]["consent"].update(
        allowed_uses="noncommercial")), "import-hf", META, "allowed_uses"),
    "meta-native-only-outside": (lambda h: edit_json(h / META, lambda m: m.update(native_only="../x.safetensors")),
                                 "import-hf", META, "native_only"),
    "expert-altered-merge": (lambda h: edit_hf_tensors(h, _hf_nudge), "merge", META, "tensor_sha256"),
    "expert-altered-import": (lambda h: edit_hf_tensors(h, _hf_nudge), "import-hf", META, "tensor_sha256"),
    "expert-nan-merge": (_hf_nan, "merge", "", "NaN"),
    "config-hidden-size-string": (lambda h: edit_json(h / CONFIG, lambda c: c.update(hidden_size="32")), "import-hf",
                                  CONFIG, ""),
    "config-llama-merge": (lambda h: edit_json(h / CONFIG, lambda c: c.update(architectures=["LlamaForCausalLM"])),
                           "merge", CONFIG, "LlamaForCausalLM"),
    "pickle-weights-merge": (_hf_pickle, "merge", "pytorch_model.bin", "pickle"),
    "index-outside-import": (_hf_index_outside, "import-hf", "model.safetensors.index.json", "shard"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_malformed_hf_directory_is_refused(case, w, tmp_path, run_cli):
    mutate, cmd, where, text = HF_CASES[case]
    hf = copy(w["hf-code"], tmp_path / "hf-code")
    mutate(hf)
    out = tmp_path / "out"
    argv = (["merge", w["public"], hf, w["pkg-math"], "--out", out] if cmd == "merge" else ["import-hf", hf, out])
    r = run_cli(argv)
    assert_refused(r, str(hf / where) if where else str(hf), out)
    assert text in r.last_line, r.last_line
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


@pytest.mark.parametrize("cmd", ["merge", "import-hf"])
def test_valid_hf_directory_is_read(cmd, w, tmp_path, run_cli):
    hf = copy(w["hf-code"], tmp_path / "hf-code")
    out = tmp_path / "out"
    r = run_cli(["merge", w["public"], hf, w["pkg-math"], "--out", out] if cmd == "merge" else ["import-hf", hf, out])
    assert r.rc == 0, r.err
    experts = json.loads((out / META).read_text())["experts"]
    assert all(len(e["tensor_sha256"]) == 64 for e in experts)


def test_import_hf_into_its_source_is_refused(w, tmp_path, run_cli):
    hf = copy(w["hf-code"], tmp_path / "hf-code")
    before = snapshot(hf)
    r = run_cli(["import-hf", hf, hf, "--overwrite"])
    assert_refused(r, "DST", hf, before)
