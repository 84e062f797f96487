"""Issue 16's speed work: `flexmoe merge` hashes its inputs in child processes (io.prehash) while it
imports torch, and writers reserve their files' space before writing (io.files.preallocate).

The output must be the library merge's, byte for byte; every input's sha256 is checked before the
first output byte; a file changed after its child read it is refused; a child that dies leaves
the parent to hash the file itself; a file system without fallocate writes as before, a full
disk fails before the first byte.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import flexmoe.io.native as native
from flexmoe.cli import main as cli
from flexmoe.flex.merge import merge
from flexmoe.io import prehash
from flexmoe.io.files import preallocate, sha256_file
from flexmoe.io.model_dir import CheckpointError
from flexmoe.io.stream import FilePool
from helpers import make_packages, make_public


@pytest.fixture(params=["children", "inline"])
def mode(request, monkeypatch):
    """Small inputs are hashed in the process (INLINE_BYTES); 0 forces child processes."""
    if request.param == "children":
        monkeypatch.setattr(prehash, "INLINE_BYTES", 0)
    return request.param


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prehash")
    public = make_public(root)
    return {"public": public, "pkgs": make_packages(root, public, ["code", "math"])}


def _weights(d):
    return {n: sha256_file(d / n) for n in sorted(os.listdir(d)) if n.endswith(".safetensors")}


def test_cli_merge_uses_the_children_and_writes_the_library_merge(mode, world, tmp_path, monkeypatch):
    used = []
    real = prehash.Prehash.digest

    def spy(self, path):
        got = real(self, path)
        used.append((Path(path).resolve(), got))
        return got

    monkeypatch.setattr(prehash.Prehash, "digest", spy)
    args = [str(world["public"]), *map(str, world["pkgs"]), "--max-shard-size", "60KB", "--quiet"]
    assert cli(["merge", *args, "--out", str(tmp_path / "cli")]) == 0
    # every weight file of the public model and both packages came from a child, none was None
    public_files = {(world["public"] / n).resolve() for n in os.listdir(world["public"]) if n.startswith("model")}
    assert {p for p, _ in used} == public_files | {(pkg / "expert.safetensors").resolve() for pkg in world["pkgs"]}
    assert all(d is not None for _, d in used)
    assert prehash.active() is None  # stopped with the command
    merge(world["public"], world["pkgs"], tmp_path / "lib", max_shard_size="60KB")
    assert _weights(tmp_path / "cli") == _weights(tmp_path / "lib") and len(_weights(tmp_path / "lib")) > 1
    meta_cli, meta_lib = (json.loads((tmp_path / d / "flexmoe.json").read_text()) for d in ("cli", "lib"))
    assert [e["tensor_sha256"] for e in meta_cli["experts"]] == [e["tensor_sha256"] for e in meta_lib["experts"]]


def test_corrupted_package_is_refused_before_any_output_byte(mode, world, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "pkg"
    bad.mkdir()
    for f in world["pkgs"][1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "expert.safetensors").read_bytes())
    data[-5] ^= 0x40  # one bit of the last weight: the header and every shape still check out
    (bad / "expert.safetensors").write_bytes(bytes(data))
    writes = []
    monkeypatch.setattr(native, "write_tensors", lambda *a, **k: writes.append(a) or {})
    rc = cli(["merge", str(world["public"]), str(world["pkgs"][0]), str(bad), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and writes == []
    assert f"{bad / 'expert.safetensors'}: sha256 does not match {bad / 'manifest.json'}" in err[-1]
    assert err[-1].endswith("; the file is corrupted")
    assert not (tmp_path / "m").exists() and not any(p.name.startswith(".m.") for p in tmp_path.iterdir())


def test_a_file_changed_after_its_child_read_it_is_refused(mode, world, tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(1 << 20))
    pre = prehash.start([f])
    try:
        assert pre.digest(f) == sha256_file(f)
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten: same size, new mtime
        with pytest.raises(CheckpointError, match="changed while it was being read"):
            pre.digest(f)
    finally:
        prehash.stop()


def test_a_dead_child_leaves_the_file_to_the_parent(world, tmp_path, monkeypatch):
    monkeypatch.setattr(prehash, "INLINE_BYTES", 0)  # a child even for a small file
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(1 << 20))
    pre = prehash.start([f])
    try:
        for proc in pre._procs:
            proc.kill()
            proc.wait()
        assert pre.digest(f) is None  # nothing reported: the pool hashes the file itself
        with FilePool() as pool:
            pool.expect(f, sha256_file(f), "listing.json")
            assert pool.prehashed() == [f]
            pool.check_expected()
        with FilePool() as pool:
            pool.expect(f, "0" * 64, "listing.json")
            with pytest.raises(CheckpointError, match="sha256 does not match listing.json"):
                pool.check_expected()
    finally:
        prehash.stop()


def test_listing_is_read_leniently(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"expert.safetensors": "x", "../up.safetensors": "y",
                                                                  "notes.txt": "z"}}))
    assert prehash.listed_weight_files(tmp_path, "manifest.json") == [tmp_path / "expert.safetensors"]
    (tmp_path / "manifest.json").write_text("{not json")
    assert prehash.listed_weight_files(tmp_path, "manifest.json") == []
    assert prehash.start([tmp_path / "missing.safetensors"]) is None


def test_the_childs_fingerprint_is_the_models(mode, world, tmp_path):
    from flexmoe.io.fingerprint import fingerprint
    from flexmoe.io.model_dir import load_model_dir, save_model_dir
    from flexmoe.io.native import open_native

    cfg, sd, meta = load_model_dir(world["public"])
    keep = {k: v for k, v in meta.items() if k not in ("router_embedding", "files")}
    sharded = save_model_dir(tmp_path / "sharded", cfg, sd, keep, max_shard_size="30KB")
    for d in (world["public"], sharded):
        files = prehash.listed_weight_files(d, "flexmoe.json", model=True)
        assert files and all(f.name.startswith("model") for f in files)
        pre = prehash.start([], fingerprint=files)
        try:
            _, lazy, _ = open_native(d)
            assert prehash.known_fingerprint(lazy) == fingerprint(sd) == meta["fingerprint"]
            assert pre.fingerprint(files[:1] if len(files) > 1 else []) is None  # another file set: not known
        finally:
            prehash.stop()
    assert len(prehash.listed_weight_files(sharded, "flexmoe.json", model=True)) > 1


def test_preallocate_reserves_the_size_and_tolerates_file_systems_without_it(tmp_path, monkeypatch):
    with open(tmp_path / "a", "wb", buffering=0) as f:
        preallocate(f, 3 << 20)
    assert (tmp_path / "a").stat().st_size == 3 << 20 and (tmp_path / "a").stat().st_blocks * 512 >= 3 << 20

    def refuse(code):
        def fallocate(fd, offset, size):
            raise OSError(code, os.strerror(code))
        return fallocate

    monkeypatch.setattr(os, "posix_fallocate", refuse(errno.EOPNOTSUPP))
    with open(tmp_path / "b", "wb", buffering=0) as f:
        preallocate(f, 1 << 20)  # no error: the writes allocate as they go
    assert (tmp_path / "b").stat().st_size == 0
    monkeypatch.setattr(os, "posix_fallocate", refuse(errno.ENOSPC))
    with open(tmp_path / "c", "wb", buffering=0) as f, pytest.raises(OSError, match="No space") as e:
        preallocate(f, 1 << 20)
    assert e.value.filename == str(tmp_path / "c")  # the command's one line names the file


@pytest.mark.parametrize("cpus,parts,want", [(1, False, 1), (2, False, 1), (4, False, 3), (2, True, 2), (4, True, 4),
                                             (64, False, prehash.MAX_WORKERS)])
def test_one_child_per_usable_cpu_and_few(tmp_path, monkeypatch, cpus, parts, want):
    """One child per usable CPU, but one when the command's pass will hash too (inputs without parts)."""
    files = []
    for i in range(12):
        files.append(tmp_path / f"f{i}.safetensors")
        files[-1].write_bytes(os.urandom(1024 * (i + 1)))
    monkeypatch.setattr(prehash, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(prehash, "INLINE_BYTES", 0)
    pre = prehash.start(files, parts={f: [f.stat().st_size] for f in files} if parts else None)
    try:
        assert len(pre._procs) == want
        assert [pre.digest(f) for f in files] == [[sha256_file(f)] if parts else sha256_file(f) for f in files]
    finally:
        prehash.stop()


def test_the_fingerprint_is_a_job_of_its_own_weight(world, tmp_path, monkeypatch):
    """With 2 children, the public model's file and its fingerprint (which reads it again) go to
    different children, and both results are the model's."""
    from flexmoe.io.fingerprint import fingerprint
    from flexmoe.io.model_dir import load_model_dir
    from flexmoe.io.native import open_native

    monkeypatch.setattr(prehash, "usable_cpus", lambda: 3)
    monkeypatch.setattr(prehash, "INLINE_BYTES", 0)
    weights = prehash.listed_weight_files(world["public"], "flexmoe.json", model=True)
    small = tmp_path / "small.safetensors"
    small.write_bytes(os.urandom(1024))
    pre = prehash.start([*weights, small], fingerprint=weights)
    try:
        assert len(pre._procs) == 2
        assert pre._fp_proc is not pre._owner[weights[0].resolve()]  # the two reads of the model run side by side
        _, lazy, _ = open_native(world["public"])
        assert prehash.known_fingerprint(lazy) == fingerprint(load_model_dir(world["public"])[1])
        assert [pre.digest(f) for f in (*weights, small)] == [sha256_file(f) for f in (*weights, small)]
    finally:
        prehash.stop()


def test_the_console_command_exits_at_once_with_its_output_flushed(world, tmp_path):
    """`flexmoe merge` ends with os._exit (cli.FAST_EXIT): its exit code, its output and its one-line
    refusal must still all arrive."""
    import subprocess
    import sys

    from flexmoe.io.model_dir import load_model_dir

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = [sys.executable, "-m", "flexmoe.cli", "merge", str(world["public"]), *map(str, world["pkgs"])]
    ok = subprocess.run([*run, "--out", str(tmp_path / "m")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "merged 2 packages" in ok.stderr
    assert load_model_dir(tmp_path / "m")[0].num_experts == 3
    bad = subprocess.run([*run, "--out", str(tmp_path / "m")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "exists and is not empty; give --out a new or empty directory")


def _files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n != "flexmoe.json"}


def test_shard_copies_on_threads_write_what_one_thread_writes(world, tmp_path, monkeypatch):
    """io.copier: each shard's kernel copies run on a worker thread while the next shard is planned;
    the files must be the single-threaded writer's byte for byte, through copy_file_range or, where
    the kernel refuses it, through pread/pwrite; a copy that fails fails the merge and leaves nothing."""
    import flexmoe.io.copier as copier
    import flexmoe.io.writer as writer

    submitted = []
    real_submit = copier.ShardCopier.submit
    monkeypatch.setattr(copier.ShardCopier, "submit", lambda self, p, c: submitted.append(len(c)) or real_submit(self, p, c))
    merge(world["public"], world["pkgs"], tmp_path / "threads", max_shard_size="40KB")
    assert len(submitted) > 1 and sum(submitted) > 0
    before = len(submitted)
    monkeypatch.setattr(writer, "usable_cpus", lambda: 1)
    merge(world["public"], world["pkgs"], tmp_path / "one", max_shard_size="40KB")
    assert len(submitted) == before  # one CPU: every copy in the writer's own thread
    monkeypatch.undo()

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(copier.os, "copy_file_range", refuse)
    merge(world["public"], world["pkgs"], tmp_path / "fallback", max_shard_size="40KB")
    one, threads, fallback = (_files(tmp_path / d) for d in ("one", "threads", "fallback"))
    assert one == threads == fallback and len(one) > 3
    meta = [json.loads((tmp_path / d / "flexmoe.json").read_text()) for d in ("one", "threads", "fallback")]
    assert meta[0]["files"] == meta[1]["files"] == meta[2]["files"]
    monkeypatch.setattr(copier, "_copy", lambda *a: 0)  # as if a source ended early under the copy
    with pytest.raises(CheckpointError, match="ended early while reading"):
        merge(world["public"], world["pkgs"], tmp_path / "broken", max_shard_size="40KB")
    assert not (tmp_path / "broken").exists() and not any(p.name.startswith(".broken") for p in tmp_path.iterdir())
