"""Hugging Face releases of document-routed merges: export-hf of an anchor_ngram / anchor_top1 merge
loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and computes what
the native merge computes (prefill, decoding with a KV cache, opt-out, greedy generate)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from flexmoe.cli import main as cli_main  # noqa: E402
from flexmoe.convert.hf_doc import REMOTE_CODE  # noqa: E402
from flexmoe.convert.hf_export import export_hf  # noqa: E402
from flexmoe.data import load_tokenizer  # noqa: E402
from flexmoe.data.ngrams import ngram_buckets  # noqa: E402
from flexmoe.eval.generate import generate  # noqa: E402
from flexmoe.flex.merge import merge  # noqa: E402
from flexmoe.flex.optout import expert_mask  # noqa: E402
from flexmoe.train.load import load_model  # noqa: E402
from hfhelpers import refuse  # noqa: E402
from helpers import TINY, make_packages, make_public  # noqa: E402

DOMAINS = ["code", "legal", "math"]
CFG = TINY.replace(vocab_size=258)  # the byte tokenizer's ids, so `flexmoe generate` can run on it
OPT_OUTS = [None, "code", "legal"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{routing: (native merged dir, HF release dir)} from one public model and three packages."""
    root = tmp_path_factory.mktemp("remote")
    public = make_public(root, CFG)
    pkgs = make_packages(root, public, DOMAINS, ngram=True)
    out = {}
    for routing in ("anchor_ngram", "anchor_top1"):
        merged = merge(public, pkgs, root / f"merged-{routing}", routing=routing)
        out[routing] = (merged, export_hf(merged, root / f"release-{routing}"))
    return out


@pytest.fixture(scope="module")
def models(built):
    from transformers import AutoModelForCausalLM

    out = {}
    for routing, (merged, release) in built.items():
        native, _, meta = load_model(merged)
        hf = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True).eval()
        out[routing] = (native.eval(), hf, meta)
    return out


def _tokens(seed: int, shape=(3, 40)) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _mask(meta, off):
    return expert_mask(meta["experts"], [off]) if off else None


@pytest.mark.parametrize("off", OPT_OUTS)
@pytest.mark.parametrize("routing", ["anchor_ngram", "anchor_top1"])
def test_prefill_logits_equal_native(models, routing, off):
    native, hf, meta = models[routing]
    tokens, mask = _tokens(0), _mask(meta, off)
    with torch.no_grad():
        want = native(tokens, mask).logits
        torch.testing.assert_close(hf(tokens, expert_mask=mask, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
        if routing == "anchor_ngram":  # the tokens really switch between experts, so the test sees routing
            from flexmoe.model.docroute import ngram_choice
            assert len(set(ngram_choice(tokens, native.domain_ngrams, mask).flatten().tolist())) >= 3


@pytest.mark.parametrize("off", OPT_OUTS)
@pytest.mark.parametrize("routing", ["anchor_ngram", "anchor_top1"])
def test_cached_decoding_equals_native_on_the_full_prefix(models, routing, off):
    from transformers.cache_utils import DynamicCache

    native, hf, meta = models[routing]
    tokens, mask = _tokens(1), _mask(meta, off)
    seen = []  # tokens the n-gram router scores per call: the prompt once, then one per step
    hook = hf.doc_router.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1])) \
        if hf.doc_router is not None else None
    try:
        with torch.no_grad():
            out = hf(tokens[:, :6], cache=DynamicCache(config=hf.config), use_cache=True, expert_mask=mask)
            steps = [out.logits]
            for t in range(6, tokens.shape[1]):
                out = hf(tokens[:, t:t + 1], cache=out.cache, use_cache=True, expert_mask=mask)
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, 1), native(tokens, mask).logits, atol=1e-5, rtol=1e-5)
    finally:
        if hook is not None:
            hook.remove()
    if routing == "anchor_ngram":
        assert seen == [6] + [1] * (tokens.shape[1] - 6)


def test_opt_out_from_the_config(built, models):
    from transformers import AutoModelForCausalLM

    native, _, meta = models["anchor_ngram"]
    hf = AutoModelForCausalLM.from_pretrained(built["anchor_ngram"][1], trust_remote_code=True,
                                              opt_out=["owner-legal"]).eval()
    tokens = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, native(tokens, _mask(meta, "legal")).logits, atol=1e-5, rtol=1e-5)
        hf.opt_out("code")  # on a loaded model
        torch.testing.assert_close(hf(tokens).logits, native(tokens, _mask(meta, "code")).logits, atol=1e-5, rtol=1e-5)
        hf.opt_out()  # all on again
        torch.testing.assert_close(hf(tokens).logits, native(tokens).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['nope'\]"):
        AutoModelForCausalLM.from_pretrained(built["anchor_ngram"][1], trust_remote_code=True, opt_out=["nope"])


@pytest.mark.parametrize("off", [None, "math"])
def test_greedy_generate_equals_flexmoe_generate(built, models, capsys, off):
    native, hf, meta = models["anchor_ngram"]
    tok = load_tokenizer("bytes")
    text = "def f(x): return x"
    prompt = torch.tensor([tok.encode(text)])
    mask = _mask(meta, off)
    got = hf.generate(prompt, max_new_tokens=24, do_sample=False, expert_mask=mask)[:, prompt.shape[1]:]
    assert torch.equal(got, generate(native, prompt, 24, expert_mask=mask))
    argv = ["generate", str(built["anchor_ngram"][0]), "--prompt", text, "--greedy", "--max-new-tokens", "24",
            "--tokenizer", "bytes", "--json"] + (["--opt-out", off] if off else [])
    capsys.readouterr()
    assert cli_main(argv) == 0
    row = got[0].tolist()
    row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
    assert json.loads(capsys.readouterr().out)["continuations"] == [tok.decode(row)]


def test_left_padded_batch_and_beam_search(models):
    native, hf, _ = models["anchor_ngram"]
    a, b = _tokens(3, (1, 12)), _tokens(4, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    attn = torch.ones_like(batch)
    attn[1, :5] = 0
    got = hf.generate(batch, attention_mask=attn, max_new_tokens=10, do_sample=False)[:, 12:]
    assert torch.equal(got[0], generate(native, a, 10)[0])
    assert torch.equal(got[1], generate(native, b, 10)[0])
    # beam search reorders the routing state with the cache: same beams as recomputing every prefix
    cached = hf.generate(a, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(cached, hf.generate(a, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False))


def test_refused_without_trust_remote_code(built):
    from transformers import AutoConfig, AutoModelForCausalLM

    release = built["anchor_ngram"][1]
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"(?s)contains custom code.*pass the argument `trust_remote_code=True`"):
            load(release)


def test_release_layout(built):
    release = built["anchor_ngram"][1]
    config = json.loads((release / "config.json").read_text())
    assert config["model_type"] == "flexmoe_doc" and config["architectures"] == ["FlexMoeDocForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flexmoe_doc.FlexMoeDocForCausalLM"
    assert [e["domain"] for e in config["experts"]] == ["public"] + DOMAINS
    # the shipped code is the package's template, and runs with torch and transformers alone
    assert (release / REMOTE_CODE.name).read_bytes() == REMOTE_CODE.read_bytes()
    tree = ast.parse(REMOTE_CODE.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m.split(".")[0] for m in imported} <= {"__future__", "inspect", "torch", "transformers"}, imported
    assert not (built["anchor_top1"][1] / "model.safetensors.index.json").exists()  # no profiles: one shard


def test_release_hashes_ngrams_as_flexmoe_does():
    spec = importlib.util.spec_from_file_location("modeling_flexmoe_doc_template", REMOTE_CODE)
    remote = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = remote  # dataclasses (the config) look their module up
    spec.loader.exec_module(remote)
    tokens = torch.randint(0, 100_000, (4, 50), generator=torch.Generator().manual_seed(5))
    for buckets in (64, 32768):
        assert torch.equal(remote.ngram_buckets(tokens, buckets), ngram_buckets(tokens, buckets))


def test_bfloat16_export_keeps_profiles_fp32(built, tmp_path):
    merged = built["anchor_ngram"][0]
    out = export_hf(merged, tmp_path / "bf16", dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["doc_router.profiles"]), "pt") as f:
        profiles = f.get_tensor("doc_router.profiles")
    with safe_open(str(out / index["lm_head.weight"]), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    native, _, _ = load_model(merged)
    assert profiles.dtype == torch.float32 and torch.equal(profiles, native.domain_ngrams)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    assert hf.lm_head.weight.dtype == torch.bfloat16  # loading in bf16 keeps the profiles fp32 too
    assert hf.doc_router.profiles.dtype == torch.float32 and torch.equal(hf.doc_router.profiles, native.domain_ngrams)


def test_anchor_doc_merge_refused(tmp_path, capsys):
    public = make_public(tmp_path, CFG)
    merged = merge(public, make_packages(tmp_path, public, ["code"]), tmp_path / "m", routing="anchor_doc")
    err = refuse(capsys, ["export-hf", str(merged), str(tmp_path / "hf"), "--allow-unrecorded-consent"], tmp_path / "hf")
    assert "model.routing='anchor_doc' has no Hugging Face release" in err
