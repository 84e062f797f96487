from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flexmoe.data import ByteTokenizer, DataError, load_manifest, prepare_data
from flexmoe.data import manifest as manifest_mod


def _shard_tokens(out: Path) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.load(out / s["path"]) for s in manifest["shards"]])


def _expected(docs: list[str], tok=None, eos: int = 256) -> list[int]:
    tok = tok or ByteTokenizer()
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc) + [eos]
    return ids


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """One file of each kind and, written by hand, the documents they should yield."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Plain text file.\nSecond line é.\n", encoding="utf-8")
    records = [
        {"text": "jsonl text doc"},
        {"question": "What is 2+2?", "answer": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "   "},  # whitespace-only: skipped
    ]
    (src / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    (src / "c.csv").write_text('label,title,body\n1,Title one,"Body, with comma\\nand a break"\n2,Title two,Body two\n')
    docs = [
        "Plain text file.\nSecond line é.\n",
        "jsonl text doc",
        "What is 2+2?\n4",
        "user: hi\nassistant: hello",
        "Title one\nBody, with comma\nand a break",
        "Title two\nBody two",
    ]
    return [src / "a.txt", src / "b.jsonl", src / "c.csv"], docs


def test_shards_equal_encodings_plus_eos(tmp_path: Path, inputs):
    files, docs = inputs
    out = tmp_path / "out"
    manifest = prepare_data(files, out, ByteTokenizer(), shard_tokens=40, domain="demo", progress=False)
    expected = _expected(docs)
    assert _shard_tokens(out).tolist() == expected
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "flexmoe-tokens/1" and manifest["domain"] == "demo"
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"] == {"type": "bytes", "vocab_size": 258}
    assert manifest["num_tokens"] == len(expected) and manifest["num_documents"] == len(docs)
    shards = manifest["shards"]
    assert [s["path"] for s in shards] == [f"shard-{i:05d}.npy" for i in range(len(shards))]
    assert [s["num_tokens"] for s in shards] == [40] * (len(expected) // 40) + [len(expected) % 40]
    assert all(np.load(out / s["path"]).dtype == np.uint16 for s in shards)
    assert [s["bytes"] for s in manifest["sources"]] == [f.stat().st_size for f in files]
    # Nothing but the result is left beside out_dir (the temp dir was renamed away).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_csv_fields_no_header_and_escape_setting(tmp_path: Path):
    with_header = tmp_path / "h.csv"
    with_header.write_text('label,title,body\n3,T,"line\\nbreak"\n')
    out = tmp_path / "o1"
    prepare_data([with_header], out, ByteTokenizer(), csv_fields=["body"], progress=False)
    assert _shard_tokens(out).tolist() == _expected(["line\nbreak"])
    # AG News as shipped: no header, numeric class column, lone backslash for line breaks.
    agnews = tmp_path / "news.csv"
    agnews.write_text('"3","Wall St. Bears","Short\\sellers are back."\n"4","Space","A second\\team flies."\n')
    out = tmp_path / "o2"
    prepare_data([agnews], out, ByteTokenizer(), csv_newline_escape="\\", progress=False)
    expected = _expected(["Wall St. Bears\nShort\nsellers are back.", "Space\nA second\nteam flies."])
    assert _shard_tokens(out).tolist() == expected
    with pytest.raises(DataError, match="csv_fields"):
        prepare_data([with_header], tmp_path / "o3", ByteTokenizer(), csv_fields=["nope"], progress=False)


class _BigVocab:
    """A fake tokenizer whose ids need more than 16 bits."""

    vocab_size, eos_id, pad_id = 70_000, 69_999, 69_998

    def encode(self, text: str) -> list[int]:
        return [66_000 + ord(c) for c in text]

    def spec(self) -> dict:
        return {"type": "fake", "vocab_size": self.vocab_size}


def test_uint32_for_large_vocab(tmp_path: Path):
    src = tmp_path / "t.txt"
    src.write_text("abc")
    manifest = prepare_data([src], tmp_path / "out", _BigVocab(), progress=False)
    tokens = _shard_tokens(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert tokens.tolist() == [66_097, 66_098, 66_099, 69_999]
    with pytest.raises(DataError, match="uint16"):
        prepare_data([src], tmp_path / "out16", _BigVocab(), dtype="uint16", progress=False)
    assert not (tmp_path / "out16").exists()
    out32 = tmp_path / "out32"
    manifest = prepare_data([src], out32, ByteTokenizer(), dtype="uint32", append_eos=False, progress=False)
    assert manifest["dtype"] == "uint32" and _shard_tokens(out32).tolist() == [97, 98, 99]


def test_out_dir_rules_and_failed_runs_leave_nothing(tmp_path: Path):
    src = tmp_path / "t.txt"
    src.write_text("first")
    out = tmp_path / "out"
    prepare_data([src], out, ByteTokenizer(), progress=False)
    src.write_text("second")
    with pytest.raises(DataError, match="overwrite=True"):
        prepare_data([src], out, ByteTokenizer(), progress=False)
    prepare_data([src], out, ByteTokenizer(), progress=False, overwrite=True)
    assert _shard_tokens(out).tolist() == _expected(["second"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=f"{bad}:2"):
        prepare_data([src, bad], tmp_path / "never", ByteTokenizer(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out", "t.txt"]
    with pytest.raises(DataError, match="text_field"):
        (tmp_path / "other.jsonl").write_text('{"body": "x"}\n')
        prepare_data([tmp_path / "other.jsonl"], tmp_path / "never", ByteTokenizer(), progress=False)
    with pytest.raises(DataError, match="missing.txt"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "never", ByteTokenizer(), progress=False)


def test_progress_line_on_stderr(tmp_path: Path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("hello")
    prepare_data([src], tmp_path / "out", ByteTokenizer(), progress=True)
    assert "1/1 files, 6 tokens" in capsys.readouterr().err


def test_manifest_sha_check_names_the_shard(tmp_path: Path):
    src = tmp_path / "t.txt"
    src.write_text("x" * 100)
    out = tmp_path / "out"
    prepare_data([src], out, ByteTokenizer(), shard_tokens=30, progress=False)
    assert load_manifest(out)["num_tokens"] == 101
    shard = out / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one token byte; size is unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        load_manifest(out)
    assert str(shard) in str(err.value) and "re-run prepare-data" in str(err.value)
    assert load_manifest(out, verify=False)["num_tokens"] == 101  # verify=False skips hashing
    shard.unlink()
    with pytest.raises(DataError, match=str(shard)):
        load_manifest(out, verify=False)
    with pytest.raises(DataError, match="manifest"):
        load_manifest(tmp_path)


def test_verification_is_cached(tmp_path: Path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text("y" * 100)
    out = tmp_path / "out"
    prepare_data([src], out, ByteTokenizer(), shard_tokens=30, progress=False)
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    load_manifest(out)
    load_manifest(out)
    assert len(calls) == 4  # four shards hashed once, not twice
