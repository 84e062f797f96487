from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flexmoe.data import ByteTokenizer, TokenWindows, build_builtin_corpora, load_shared_corpora, prepare_data
from flexmoe.data.corpora import DOMAINS, MAX_DOC_BYTES, SHARED_FILES, chunk_lines


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpora")
    return out, build_builtin_corpora(out)


def test_four_domains_disjoint_and_big_enough(built):
    out, result = built
    assert sorted(result) == sorted(DOMAINS)
    sources = json.loads((out / "SOURCES.json").read_text())["domains"]
    sizes = {}
    for domain in DOMAINS:
        assert result[domain] == {"train": [out / domain / "train.jsonl"], "val": [out / domain / "val.jsonl"]}
        train, val = _docs(result[domain]["train"][0]), _docs(result[domain]["val"][0])
        assert train and val and not set(train) & set(val), domain
        assert len(val) == round(len(train + val) * 0.05), domain
        assert (len(train), len(val)) == (sources[domain]["train_documents"], sources[domain]["val_documents"])
        # Chunks stay under 8 KB unless a single line is longer than that.
        assert all(len(d.encode("utf-8")) <= MAX_DOC_BYTES or "\n" not in d.rstrip("\n") for d in train + val)
        sizes[domain] = sum(len(d.encode("utf-8")) for d in train + val)
        assert sizes[domain] == sources[domain]["bytes"] and sizes[domain] <= 1_500_000 + MAX_DOC_BYTES
    assert "pydoc_data" in sources["public"]["origin"]
    assert all(name.endswith(".py") for name in sources["code"]["files"])
    assert {d: sizes[d] >= 100_000 for d in ("public", "code", "math")} == {"public": True, "code": True, "math": True}
    if sizes["legal"] < 100_000:
        pytest.skip(f"only {sizes['legal']} bytes of licence text installed here ({len(sources['legal']['files'])} files)")
    assert sizes["legal"] >= 100_000


def test_build_is_deterministic(built, tmp_path: Path):
    out, _ = built
    build_builtin_corpora(tmp_path)
    for rel in ["SOURCES.json"] + [f"{d}/{s}.jsonl" for d in DOMAINS for s in ("train", "val")]:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_math_answers_are_correct(built):
    _, result = built
    text = "\n".join(_docs(result["math"]["train"][0]) + _docs(result["math"]["val"][0]))
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    checked = 0
    for a, op, b, value in re.findall(r"(\d+) ([-+*/]) (\d+) = \?\nA: (\d+)", text):
        assert ops[op](int(a), int(b)) == int(value)
        checked += 1
    for a, op, b, value in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", text):
        assert ops[op](int(a), int(b)) == int(value)
        checked += 1
    assert checked > 10_000
    assert text.count("The answer is") > 3_000 and "How many" in text


def test_small_build_prepares(tmp_path: Path):
    result = build_builtin_corpora(tmp_path / "c", max_bytes_per_domain=20_000, val_fraction=0.1, seed=3)
    for domain in DOMAINS:
        out = tmp_path / "tok" / domain
        manifest = prepare_data(result[domain]["train"], out, ByteTokenizer(), domain=domain, progress=False)
        train = _docs(result[domain]["train"][0])
        # Byte tokenizer: one token per UTF-8 byte plus one eos per document.
        assert manifest["num_documents"] == len(train)
        assert manifest["num_tokens"] == sum(len(d.encode("utf-8")) + 1 for d in train)
        assert TokenWindows(tmp_path / "tok" / domain, seq_len=64).domain == domain


def test_chunk_lines():
    text = "".join(f"line {i:04d}\n" for i in range(2000))  # 20,000 bytes
    chunks = chunk_lines(text, 1000)
    assert "".join(chunks) == text and all(len(c) <= 1000 for c in chunks) and len(chunks) == 20
    assert chunk_lines("x" * 50, 10) == ["x" * 50]  # one long line stays whole


def test_load_shared_corpora(tmp_path: Path):
    assert load_shared_corpora(tmp_path / "absent") == {}
    for name in SHARED_FILES.values():
        (tmp_path / name).write_text("x")
    found = load_shared_corpora(tmp_path)
    assert found == {
        "math": tmp_path / "gsm8k_train.jsonl",
        "news": tmp_path / "agnews_7600.csv",
        "creative": tmp_path / "tinyshakespeare.txt",
    }
    (tmp_path / "agnews_7600.csv").unlink()
    assert sorted(load_shared_corpora(tmp_path)) == ["creative", "math"]
