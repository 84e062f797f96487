"""tools/release_checklist.py (issue 18, point 6): passes a consented release and its export, and
fails, naming the problem, on an expert without consent, a tampered file and a missing tokenizer."""

import importlib.util
import json
from pathlib import Path

import pytest

from flexmoe.cli import main as cli
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.io.model_dir import load_model_dir, save_model_dir

from helpers import TINY, make_public, make_trained_anchor

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("release_checklist", ROOT / "tools" / "release_checklist.py")
checklist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checklist)


def _world(root: Path, uses: dict) -> Path:
    public = make_public(root, TINY.replace(vocab_size=258))
    cfg, sd, meta = load_model_dir(public)
    pkgs = []
    for i, (d, u) in enumerate(uses.items()):
        trained = make_trained_anchor(root, public, d, seed=500 + i)
        tcfg, tsd, tmeta = load_model_dir(trained)
        trained = save_model_dir(root / f"t-{d}", tcfg, tsd, dict(tmeta, tokenizer="bytes"))
        pkgs.append(make_package(trained, root / f"pkg-{d}", owner=f"o-{d}", domain=d, allowed_uses=u))
    return merge(public, pkgs, root / "merged", top_k=2, routing="topk")


def test_checklist_passes_a_consented_release_and_its_export(tmp_path, capsys):
    pytest.importorskip("transformers")
    merged = _world(tmp_path, {"a": ["research"], "b": ["research", "commercial"]})
    meta = json.loads((merged / "flexmoe.json").read_text())
    meta["tokenizer"] = "bytes"  # the toy public model records none; the merge takes the public one's
    (merged / "flexmoe.json").write_text(json.dumps(meta))
    assert checklist.main([str(merged), "--use", "research"]) == 0
    assert checklist.main([str(merged), "--use", "commercial"]) == 1
    assert "consent does not cover commercial: o-a/a" in capsys.readouterr().out
    assert cli(["export-hf", str(merged), str(tmp_path / "hf"), "--use", "research"]) == 0
    assert checklist.main([str(tmp_path / "hf"), "--use", "research"]) == 0
    out = capsys.readouterr().out
    assert "[ok] tokenizer loads" in out and "[ok] model card lists every expert" in out
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert checklist.main([str(tmp_path / "hf")]) == 1
    assert "no tokenizer.json" in capsys.readouterr().out


def test_checklist_fails_unrecorded_consent_and_tampering(tmp_path, capsys):
    merged = _world(tmp_path, {"a": None, "b": ["research"]})
    assert checklist.main([str(merged)]) == 1
    out = capsys.readouterr().out
    assert "no consent record: o-a/a" in out and "no tokenizer recorded" in out
    weights = merged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checklist.main([str(merged)]) == 1
    assert "[FAIL] files and expert tensors verify" in capsys.readouterr().out
    assert checklist.main([str(tmp_path / "nowhere")]) == 2
