"""native -> export-hf -> transformers computes our logits; HF -> import-hf -> export-hf is byte-identical."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexmoe.cli import main as cli_main
from flexmoe.convert.hf_export import export_hf
from flexmoe.convert.hf_import import import_hf
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir
from hfhelpers import hf_model, hf_tensors, make_native, random_config, save_hf

transformers = pytest.importorskip("transformers")

CASES = {"dense": (1, False, False), "dense_gqa": (2, False, True), "moe": (3, True, False), "moe_gqa": (4, True, True)}


def _tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_our_logits(tmp_path, case):
    cfg = random_config(*CASES[case])
    assert cfg.is_moe == CASES[case][1] and (cfg.kv_heads < cfg.num_heads) == CASES[case][2]
    native = make_native(tmp_path, cfg, seed=7)
    rc = cli_main(["export-hf", str(native), str(tmp_path / "hf"), "--max-shard-size", "8KB",
                  "--allow-unrecorded-consent"])  # the test experts carry no consent record
    assert rc == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("FlexOlmoForCausalLM" if cfg.is_moe else "Olmo2ForCausalLM")
    assert hf.dtype == torch.float32
    ours, _, _ = load_model(native)
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        ref, got = hf(tokens).logits, ours.eval()(tokens).logits
    assert ref.abs().max() > 0.1  # logits that carry the weights, not a degenerate zero model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_hf_import_export_is_byte_identical(tmp_path, moe, dtype):
    cfg = random_config(5, moe, gqa=True)
    model = hf_model(cfg, seed=3)
    src = save_hf(model, tmp_path / "src", dtype=dtype)
    assert len(list(src.glob("model-*.safetensors"))) > 1  # sharded input
    import_hf(src, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "out", max_shard_size="20KB")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert all(v[0] == str(dtype) for v in b.values())
    if dtype == torch.float32:  # and the native model in between computes what the HF one does
        ours, _, meta = load_model(tmp_path / "native")
        tokens = _tokens(cfg.vocab_size, 1)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)
        want_kind = ("anchor" if cfg.num_experts == 2 else "merged") if moe else "public"
        assert meta["kind"] == want_kind


def test_tied_embeddings_import_untied(tmp_path):
    """A checkpoint saved with tied embeddings (no lm_head tensor) imports with the head = the embedding."""
    cfg = random_config(2, moe=False, gqa=True)
    model = hf_model(cfg, seed=5, tie_word_embeddings=True)
    src = save_hf(model, tmp_path / "tied")
    assert "lm_head.weight" not in hf_tensors(src)
    ours, _, _ = load_model(import_hf(src, tmp_path / "native"))
    tokens = _tokens(cfg.vocab_size, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_fused_single_file_import_equals_per_expert(tmp_path):
    """transformers-5's in-memory fused expert layout, saved as one file, imports to the same native tensors."""
    cfg = random_config(6, moe=True, gqa=False)
    model = hf_model(cfg, seed=4)
    src = save_hf(model, tmp_path / "per-expert")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((src / "config.json").read_text())
    sd = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(fused / "model.safetensors"))
    _, sd_a, _ = load_model_dir(import_hf(src, tmp_path / "a"))
    _, sd_b, _ = load_model_dir(import_hf(fused, tmp_path / "b"))
    assert sorted(sd_a) == sorted(sd_b)
    assert [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])] == []


def test_tokenizer_and_names_travel(tmp_path):
    cfg = random_config(3, moe=True, gqa=False)
    src = save_hf(hf_model(cfg), tmp_path / "src")
    tok = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}', "tokenizer_config.json": '{"x": 1}',
           "special_tokens_map.json": "{}", "merges.txt": "a b\n"}
    for name, text in tok.items():
        (src / name).write_text(text)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nowner: acme\ndomain: law\n---\n# card\n")
    native = import_hf(src, tmp_path / "native")
    meta = json.loads((native / "flexmoe.json").read_text())
    assert meta["tokenizer"] == {"type": "hf", "path": "tokenizer"}
    assert {n: (native / "tokenizer" / n).read_text() for n in tok} == tok
    want = ["public"] + (["acme"] if cfg.num_experts == 2 else [f"expert{j}" for j in range(1, cfg.num_experts)])
    assert [e["owner"] for e in meta["experts"]] == want
    out = export_hf(native, tmp_path / "out")
    assert {n: (out / n).read_text() for n in tok} == tok
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    # export-hf writes the names into flexmoe.json, which import-hf reads back
    again = json.loads((import_hf(out, tmp_path / "again") / "flexmoe.json").read_text())
    assert again["experts"] == meta["experts"] and again["base_fingerprint"] == meta["base_fingerprint"]


def test_export_bfloat16(tmp_path):
    cfg = random_config(4, moe=True, gqa=True)
    native = make_native(tmp_path, cfg)
    out = export_hf(native, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, sd, _ = load_model_dir(native)
    got = hf_tensors(out)
    w = sd["layers.0.ffn.experts.up_proj"][1].to(torch.bfloat16)
    assert got["model.layers.0.mlp.experts.1.up_proj.weight"][2] == w.view(torch.uint8).numpy().tobytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16


def test_native_round_trip_keeps_what_hf_cannot_hold(tmp_path):
    """native -> HF -> native: every tensor (domain centroids included) and the public router row come back."""
    from helpers import make_public

    public = make_public(tmp_path)
    cfg = random_config(12, moe=True, gqa=True).replace(doc_ngram_buckets=16)
    native = make_native(tmp_path, cfg)
    _, sd, _ = load_model_dir(native)
    assert sd["domain_centroids"].abs().sum() > 0 and sd["domain_ngrams"].shape == (cfg.num_experts, 16)
    for src in (public, native):
        back = import_hf(export_hf(src, tmp_path / f"hf-{src.name}"), tmp_path / f"back-{src.name}")
        _, a, meta_a = load_model_dir(src)
        _, b, meta_b = load_model_dir(back)
        assert sorted(a) == sorted(b)
        assert load_model_dir(back)[0].doc_ngram_buckets == load_model_dir(src)[0].doc_ngram_buckets
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
        if src == public:
            rows = [load_file(str(d / m["router_embedding"]["router_public"]))["router_embedding"]
                    for d, m in ((src, meta_a), (back, meta_b))]
            assert torch.equal(rows[0], rows[1]) and meta_b["files"]["router_public.safetensors"]
            assert meta_b["fingerprint"] == meta_a["fingerprint"]
