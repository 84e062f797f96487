"""Tokenizers travel (issue 18, point 4): every model directory made from one carries its HF
tokenizer (branch, merge, remove-expert, export-hf), and a bytes model exports an HF tokenizer that
`AutoTokenizer` loads, giving exactly ByteTokenizer's ids and the text back."""

import json
import shutil

import pytest
import torch

from flexmoe.data import ByteTokenizer
from flexmoe.data.tokenize import train_bpe, write_hf_byte_tokenizer
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.flex.release import remove_expert
from flexmoe.flex.router_init import attach_public_embedding
from flexmoe.convert.hf_export import export_hf
from flexmoe.convert.hf_import import import_hf
from flexmoe.io.model_dir import load_model_dir, save_model_dir

from helpers import TINY, make_public

TEXTS = ["def add(a, b):\n    return a + b\n", "The licence grants permission to use, copy and modify.",
         "12 + 30 = 42\n7 * 6 = 42\n"] * 20
SAMPLES = ["hello world", "  tabs\tand\nnewlines ", "naïve — 漢字 🙂", "", "<|endoftext|> is text here"]


def test_hf_tokenizer_is_carried_through_the_lifecycle(tmp_path):
    tok_dir = tmp_path / "bpe"
    train_bpe(TEXTS, 280, tok_dir)
    want = (tok_dir / "tokenizer.json").read_bytes()
    cfg = TINY.replace(vocab_size=280)
    public = make_public(tmp_path / "made", cfg)
    pcfg, sd, meta = load_model_dir(public)
    meta = {k: v for k, v in meta.items() if k not in ("router_embedding", "files")}
    public = save_model_dir(tmp_path / "public", pcfg, sd, dict(meta, tokenizer=str(tok_dir)))
    attach_public_embedding(public, tmp_path / "made" / "public_rows.safetensors")
    shutil.rmtree(tok_dir)  # from here on, only the copies the model directories carry exist
    assert (public / "tokenizer" / "tokenizer.json").read_bytes() == want
    assert json.loads((public / "flexmoe.json").read_text())["tokenizer"] == {"type": "hf", "path": "tokenizer"}
    rows = torch.randn(cfg.num_layers, cfg.d_model)
    branched = branch(public, tmp_path / "anchor", rows)
    assert (branched / "tokenizer" / "tokenizer.json").read_bytes() == want
    pkgs = []
    for d in ("a", "b"):
        own = branch(public, tmp_path / f"anchor-{d}", torch.randn(cfg.num_layers, cfg.d_model))
        bcfg, bsd, bmeta = load_model_dir(own)
        for k, v in bsd.items():
            if ".ffn.experts." in k:
                v[1] += 0.05 * torch.randn_like(v[1])
        trained = save_model_dir(tmp_path / f"trained-{d}", bcfg, bsd, bmeta)
        assert (trained / "tokenizer" / "tokenizer.json").read_bytes() == want  # train's final path: same writer
        pkgs.append(make_package(trained, tmp_path / f"pkg-{d}", owner=f"o-{d}", domain=d, allowed_uses=["research"]))
    merged = merge(public, pkgs, tmp_path / "merged", top_k=2, routing="topk")
    assert (merged / "tokenizer" / "tokenizer.json").read_bytes() == want
    release = remove_expert(merged, tmp_path / "release", "a")
    assert (release / "tokenizer" / "tokenizer.json").read_bytes() == want
    hf = export_hf(release, tmp_path / "hf")
    assert (hf / "tokenizer.json").read_bytes() == want
    back = import_hf(hf, tmp_path / "back")
    assert (back / "tokenizer" / "tokenizer.json").read_bytes() == want


def test_bytes_export_loads_in_autotokenizer_with_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_byte_tokenizer(tmp_path / "tok", 1024)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ours = ByteTokenizer()
    for text in SAMPLES[:-1]:
        ids = auto(text, add_special_tokens=True)["input_ids"]
        assert ids == ours.encode(text), (text, ids)
        assert auto.decode(ids) == text == ours.decode(ids)
    # the one difference, as in every HF tokenizer: the special token's text is the special token
    assert auto(SAMPLES[-1])["input_ids"] == [ours.eos_id] + ours.encode(" is text here")
    assert (auto.eos_token_id, auto.pad_token_id) == (ours.eos_id, ours.pad_id)


def test_bytes_model_export_ships_the_tokenizer_and_imports_as_bytes(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = TINY.replace(vocab_size=258)
    public = make_public(tmp_path, cfg)
    pcfg, sd, meta = load_model_dir(public)
    meta = {k: v for k, v in meta.items() if k not in ("router_embedding", "files")}
    native = save_model_dir(tmp_path / "native", pcfg, sd, dict(meta, tokenizer="bytes"))
    hf = export_hf(native, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert auto("naïve 漢字")["input_ids"] == ByteTokenizer().encode("naïve 漢字")
    back = import_hf(hf, tmp_path / "back")
    assert json.loads((back / "flexmoe.json").read_text())["tokenizer"] == "bytes"
