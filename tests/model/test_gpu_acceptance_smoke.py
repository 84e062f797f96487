"""benchmarks/gpu_acceptance.py runs here at toy size (--cpu-smoke): its parity checks pass, grouped
GEMM really runs in the grouped case, and the summary has every field the GPU run reports."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_cpu_smoke_passes_and_takes_the_grouped_path(tmp_path, monkeypatch):
    mod = _load()
    calls = []
    real = F.grouped_mm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "grouped_mm", counted)
    assert mod.main(["--cpu-smoke", "--steps", "2", "--curve-steps", "3", "--json", str(tmp_path / "s.json")]) == 0
    assert calls, "the grouped case never called grouped_mm"
    summary = json.loads((tmp_path / "s.json").read_text())
    names = [c["check"] for c in summary["checks"]]
    assert names[0].startswith("grouped vs loop") and summary["checks"][0]["ok"] is True
    assert summary["checks"][2]["ok"] is True and summary["checks"][2]["rel_max"] < 0.01
    assert summary["throughput"]["tokens_per_s"] > 0 and summary["throughput"]["trainable"] < summary["throughput"]["params"]


def test_without_a_gpu_it_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _load().main([]) == 2
