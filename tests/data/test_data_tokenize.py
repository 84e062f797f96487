from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexmoe.data import ByteTokenizer, DataError, HFTokenizer, load_tokenizer, train_bpe

SAMPLES = ["héllo, wörld — 日本語\n\ttabs  and  spaces", "def f(x):\n    return x * 2\n", "", "🙂 emoji"]


def _corpus() -> list[str]:
    words = "the cat sat on a mat while dogs ran past quickly under bright yellow lamps".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i}" for i in range(400)]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids + [256, 257]) == text  # special ids are skipped
    assert tok.encode("é") == [195, 169]
    assert tok.decode([195]) == "\ufffd"  # broken UTF-8 is replaced, not raised
    assert load_tokenizer("bytes").spec() == tok.spec() == {"type": "bytes", "vocab_size": 258}
    assert isinstance(load_tokenizer(tok.spec()), ByteTokenizer)


def test_train_bpe_vocab_size_and_round_trip(tmp_path: Path):
    tok = train_bpe(_corpus(), 300, tmp_path / "tok")
    # Rule: exactly the requested size when the corpus has enough merges (this one does).
    assert tok.vocab_size == 300
    assert tok.eos_id == 0 and tok.id_to_token(0) == "<|endoftext|>"
    assert tok.pad_id == 1 and tok.id_to_token(1) == "<|pad|>"
    for text in SAMPLES + ["the cat sat on a mat 17"]:
        assert tok.decode(tok.encode(text)) == text
    # Merges were learnt: frequent text takes fewer tokens than bytes.
    assert len(tok.encode("the cat sat on a mat")) < len("the cat sat on a mat")
    # A literal special-token string in a document stays text, never becomes eos.
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|endoftext|> b"
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_train_bpe_small_corpus_gives_at_most_requested(tmp_path: Path):
    tok = train_bpe(["ab ab ab"], 5000, tmp_path / "tok")
    # Rule: never more than requested; fewer when the corpus runs out of merges.
    assert 258 <= tok.vocab_size < 5000
    with pytest.raises(DataError, match="vocab_size=100"):
        train_bpe(["x"], 100, tmp_path / "small")


def test_hf_spec_save_and_load(tmp_path: Path):
    tok = train_bpe(_corpus(), 290, tmp_path / "tok")
    spec = tok.spec()
    assert spec["type"] == "hf" and spec["vocab_size"] == 290 and len(spec["sha256"]) == 64
    again = load_tokenizer(json.loads(json.dumps(spec)))
    assert isinstance(again, HFTokenizer) and again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    saved = tok.save(tmp_path / "ckpt" / "tokenizer")
    copy = load_tokenizer(saved)
    assert [copy.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert (copy.eos_id, copy.pad_id, copy.vocab_size) == (0, 1, 290)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    # A spec whose sha256 no longer matches the file is refused.
    bad = dict(spec, sha256="0" * 64)
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(bad)


def test_hf_reads_special_tokens_from_config(tmp_path: Path):
    tok = train_bpe(_corpus(), 280, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    assert HFTokenizer(tmp_path / "tok").eos_id == 1
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(DataError, match="special_tokens_map.json"):
        HFTokenizer(tmp_path / "tok")


def test_transformers_loads_saved_tokenizer(tmp_path: Path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    tok = train_bpe(_corpus(), 300, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.save(tmp_path / "saved")))
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    text = "the cat sat on a mat 42"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_load_tokenizer_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(empty))
    with pytest.raises(DataError, match="unknown"):
        load_tokenizer({"type": "sentencepiece"})
