"""Streaming: many shards with a correct index, the fingerprint without loading, bounded memory, progress."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flexmoe.config import ModelConfig
from flexmoe.convert.hf_export import export_hf, parse_size
from flexmoe.io.native import open_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.io.stream import FilePool, stream_fingerprint
from flexmoe.io.fingerprint import fingerprint
from hfhelpers import hf_tensors, make_native, random_config


def test_many_shards_and_a_correct_index(tmp_path):
    native = make_native(tmp_path, random_config(8, moe=True, gqa=True))
    _, sd, _ = load_model_dir(native)
    total = sum(v.numel() * 4 for k, v in sd.items() if k != "domain_centroids")
    limit = total // 6
    out = export_hf(native, tmp_path / "hf", max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 6
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == total
    tensors = hf_tensors(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    for shard in shards:
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())
        assert sorted(keys) == sorted(k for k, s in index["weight_map"].items() if s == shard.name)
        size = sum(len(tensors[k][2]) for k in keys)
        assert size <= limit or len(keys) == 1, (shard.name, size, limit)


def test_plain_copy_fallback_gives_the_same_files(tmp_path, monkeypatch):
    """Where copy_file_range fails (some filesystems), reads and writes produce the same bytes."""
    native = make_native(tmp_path, random_config(10, moe=True, gqa=True))
    fast = export_hf(native, tmp_path / "fast", max_shard_size="16KB")

    def unsupported(*a, **k):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    slow = export_hf(native, tmp_path / "slow", max_shard_size="16KB")
    names = sorted(p.name for p in fast.iterdir() if p.is_file())
    assert names == sorted(p.name for p in slow.iterdir() if p.is_file()) and len(names) > 4
    assert [n for n in names if (fast / n).read_bytes() != (slow / n).read_bytes()] == []


@pytest.mark.parametrize("moe", [False, True])
def test_stream_fingerprint_equals_fingerprint(tmp_path, moe):
    native = make_native(tmp_path, random_config(9, moe=moe, gqa=False))
    _, sd, _ = load_model_dir(native)
    _, lazy, _ = open_native(native)
    with FilePool(chunk=64) as pool:  # tiny chunks: tensors span many reads
        assert stream_fingerprint(lazy, pool) == fingerprint(sd)
        k = "layers.0.ffn.experts.down_proj" if moe else "layers.0.ffn.down_proj.weight"
        want = sd[k][1] if moe else sd[k]
        assert torch.equal(pool.read(lazy[k][1] if moe else lazy[k]), want)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1234) == 1234
    assert parse_size("1.5 KB") == 1500
    for bad in ("5 parsecs", "-1GB", "0", ""):
        with pytest.raises(ValueError, match="max-shard-size"):
            parse_size(bad)


def test_progress_line():
    clock = iter([0.0, 1.0, 2.0, 4.0, 4.0]).__next__
    buf = io.StringIO()
    p = Progress("export-hf m", 4_000_000, stream=buf, clock=clock, log_every=1.0)
    p.advance(1_000_000)  # t=1
    p.advance(1_000_000)  # t=2
    assert buf.getvalue().splitlines()[-1] == "[flexmoe] export-hf m: 2.0 MB / 4.0 MB (50%), 1.0 MB/s, ETA 2s"
    p.advance(2_000_000)  # t=4
    p.finish("done")
    assert buf.getvalue().splitlines()[-1] == "[flexmoe] export-hf m: done, 4.0 MB in 4.0s (1.0 MB/s)"


def test_progress_shard_lines_quiet_and_tqdm_on_a_terminal():
    clock = iter([0.0, 2.0, 4.0, 5.0]).__next__
    buf = io.StringIO()
    p = Progress("merge 6 packages", 4_000_000, stream=buf, clock=clock, log_every=10.0)
    p.advance(2_000_000)  # t=2: no line yet (a log gets one per shard, or every 10 s)
    assert buf.getvalue() == ""
    p.shard_done("model-00001-of-00002.safetensors", 1, 2)  # t=4
    assert buf.getvalue().splitlines() == ["[flexmoe] merge 6 packages: 2.0 MB / 4.0 MB (50%), 500.0 KB/s, ETA 4s "
                                           "[shard 1/2 model-00001-of-00002.safetensors]"]
    quiet = io.StringIO()
    q = Progress("merge", 10, stream=quiet, quiet=True)
    q.advance(5), q.shard_done("x", 1, 2), q.finish("done")
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    t = Progress("merge", 3_000_000, stream=term)
    t.advance(1_500_000)
    assert t._bar is not None and t._bar.n == 1_500_000  # a tqdm bar: bytes, rate and ETA
    t.finish("done")
    shown = term.getvalue()
    assert "\r[flexmoe] merge:" in shown and "/3.00M [" in shown and "B/s]" in shown, shown  # redrawn in place
    assert shown.rstrip().split("\r")[-1].startswith("[flexmoe] merge: done, 1.5 MB in ")


def test_quiet_flag_silences_a_sharded_merge(tmp_path):
    from flexmoe.cli import main
    from helpers import make_packages, make_public

    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, ["a", "b"])
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        assert main(["merge", str(public), *map(str, pkgs), "--out", str(tmp_path / "m"), "--max-shard-size", "20KB",
                     "--quiet"]) == 0
        assert main(["merge", str(public), *map(str, pkgs), "--out", str(tmp_path / "m2"), "--max-shard-size", "20KB"]) == 0
    lines = err.getvalue().splitlines()
    shards = len(list((tmp_path / "m2").glob("model-*.safetensors")))
    assert shards > 3 and len([x for x in lines if "[shard " in x]) == shards, lines  # only the second run speaks
    # then the closing line, and one privacy line per expert
    assert lines[-3].startswith("[flexmoe] merged 2 packages") and len(lines) == shards + 4
    assert all(x.startswith("[flexmoe] privacy: slot ") for x in lines[-2:])


CHILD = textwrap.dedent("""
    import sys
    from flexmoe.convert.hf_export import export_hf
    from flexmoe.convert.hf_import import import_hf

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def grow(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS")
        fn()
        return status("VmHWM") - base

    print(grow(lambda: export_hf(sys.argv[1], sys.argv[2], max_shard_size="8MB")),
          grow(lambda: import_hf(sys.argv[2], sys.argv[3])))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_peak_memory_stays_far_below_model_size(tmp_path):
    """96 MB of weights are converted both ways with well under half of that in new resident memory."""
    cfg = ModelConfig(vocab_size=1024, d_model=256, num_layers=4, num_heads=4, d_ff=1024, num_experts=8, top_k=2)
    torch.manual_seed(0)
    from flexmoe.model import Transformer

    sd = Transformer(cfg).state_dict()
    size = sum(v.numel() * v.element_size() for v in sd.values())
    assert size > 90e6
    native = save_model_dir(tmp_path / "big", cfg, sd, {"kind": "merged", "experts": []})
    del sd
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", CHILD, str(native), str(tmp_path / "hf"), str(tmp_path / "back")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    grow_export, grow_import = map(int, res.stdout.split())
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 12
    # one 16 MiB copy chunk plus small change; loading the model would add its full 96+ MB
    assert grow_export < 0.3 * size and grow_import < 0.3 * size, (grow_export, grow_import, size)
