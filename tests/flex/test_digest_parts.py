"""Files recorded by parts (io.digests) and expert records of tensor_sha256 format 2 (io.fingerprint).

Writers record a weight file as its parts' sha256s (header, each tensor, a per-expert tensor slot
by slot). A merge of parts-recorded inputs takes each copied slot's digest from its input's
verified record instead of hashing it, and copies those bytes in the kernel: the digests it
composes must be the ones hashing the output gives. Checking parts checks every byte; a corrupted
byte is refused naming its range. Older records (whole-file sha256s, tensor_sha256 format 1,
package format 1) still verify and merge to the same weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexmoe.io.native as native
from flexmoe.cli import main as cli
from flexmoe.flex.merge import merge
from flexmoe.flex.release import remove_expert
from flexmoe.io import digests, prehash
from flexmoe.io.files import sha256_file
from flexmoe.io.fingerprint import expert_tensor_sha256
from flexmoe.io.model_dir import CheckpointError, load_model_dir
from flexmoe.io.stream import FilePool
from helpers import make_packages, make_public


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    public = make_public(root)
    return {"root": root, "public": public, "pkgs": make_packages(root, public, ["code", "math"])}


@pytest.fixture
def children(monkeypatch):
    """Child processes hash every input (not only large ones), two of them."""
    monkeypatch.setattr(prehash, "INLINE_BYTES", 0)
    monkeypatch.setattr(prehash, "usable_cpus", lambda: 2)


def _meta(d):
    return json.loads((d / "flexmoe.json").read_text())


def _shards(d):
    return sorted(p.name for p in d.glob("model*.safetensors"))


def test_writers_record_parts_that_tile_the_file(world):
    pkg = json.loads((world["pkgs"][0] / "manifest.json").read_text())
    assert pkg["format"].endswith("/2") and digests.is_parts(pkg["files"]["expert.safetensors"])
    for d, where in ((world["public"], "flexmoe.json"), (world["pkgs"][0], "manifest.json")):
        for path, rec in prehash.listed_records(d, where, model=where == "flexmoe.json").items():
            lengths = digests.part_lengths(rec)
            assert sum(lengths) == path.stat().st_size and len(lengths) > 3  # header + one part per tensor
            assert digests.hash_file(path, lengths) == [h for _, h in rec["parts"]]


def test_cli_merge_composes_the_digests_hashing_would_give(world, tmp_path, children, monkeypatch):
    copied = []
    real = FilePool.copy_into

    def spy(self, t, out):
        copied.append(t.nbytes)
        yield from real(self, t, out)

    monkeypatch.setattr(FilePool, "copy_into", spy)
    from flexmoe.io.copier import ShardCopier

    real_submit = ShardCopier.submit

    def submitted(self, path, copies):  # a shard's kernel copies left to a thread (io.copier)
        copied.extend(length for _, _, length, _, _ in copies)
        return real_submit(self, path, copies)

    monkeypatch.setattr(ShardCopier, "submit", submitted)
    args = [str(world["public"]), *map(str, world["pkgs"]), "--max-shard-size", "40KB", "--quiet"]
    assert cli(["merge", *args, "--out", str(tmp_path / "cli")]) == 0
    cfg, sd, meta = load_model_dir(tmp_path / "cli")  # verifies every part and every expert record
    # every expert slot (public FFN, both packages' experts) was copied in the kernel, not hashed
    slots = [sd[k][0].numel() * sd[k].element_size() for k in sd if ".experts." in k] * cfg.num_experts
    assert sum(copied) >= sum(slots) > 0
    # hashing the written files gives exactly the composed digests
    for name in _shards(tmp_path / "cli"):
        rec = meta["files"][name]
        assert digests.hash_file(tmp_path / "cli" / name, digests.part_lengths(rec)) == [h for _, h in rec["parts"]]
    assert all(e["tensor_sha256_format"] == 2 and e["tensor_sha256"] == expert_tensor_sha256(sd, j, cfg.num_layers)
               for j, e in enumerate(meta["experts"]))
    # the library merge (no children, every part hashed as written) writes the same files and records
    monkeypatch.setattr(FilePool, "copy_into", real)
    merge(world["public"], world["pkgs"], tmp_path / "lib", max_shard_size="40KB")
    lib = _meta(tmp_path / "lib")
    assert {n: lib["files"][n] for n in _shards(tmp_path / "lib")} == {n: meta["files"][n] for n in _shards(tmp_path / "cli")}
    assert [e["tensor_sha256"] for e in lib["experts"]] == [e["tensor_sha256"] for e in meta["experts"]]


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_damaged_parts_recorded_file_is_refused_naming_where(world, tmp_path, damage):
    out = merge(world["public"], world["pkgs"], tmp_path / "m", max_shard_size="40KB")
    shard = out / _shards(out)[1]
    rec = _meta(out)["files"][shard.name]
    data = bytearray(shard.read_bytes())
    at = rec["parts"][0][0] + rec["parts"][1][0] + 5  # inside the third part
    if damage == "flip":
        data[at] ^= 0x01
    elif damage == "truncate":
        data = data[:-4]
    else:
        data += b"\0"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_model_dir(out)
    msg = str(e.value)
    assert msg.startswith(f"{shard}: sha256 does not match {out / 'flexmoe.json'}") and msg.endswith("corrupted")
    if damage == "flip":
        start = rec["parts"][0][0] + rec["parts"][1][0]
        assert f"(bytes {start}-{start + rec['parts'][2][0] - 1})" in msg
    else:
        assert "bytes than the record's parts" in msg


def test_a_corrupted_parts_package_is_refused_by_the_cli_before_any_byte(world, tmp_path, children, monkeypatch, capsys):
    bad = tmp_path / "pkg"
    bad.mkdir()
    for f in world["pkgs"][1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    rec = json.loads((bad / "manifest.json").read_text())["files"]["expert.safetensors"]
    data = bytearray((bad / "expert.safetensors").read_bytes())
    data[rec["parts"][0][0] + 3] ^= 0x40  # in the first tensor
    (bad / "expert.safetensors").write_bytes(bytes(data))
    writes = []
    monkeypatch.setattr(native, "write_tensors", lambda *a, **k: writes.append(a) or {})
    rc = cli(["merge", str(world["public"]), str(world["pkgs"][0]), str(bad), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and writes == [] and not (tmp_path / "m").exists()
    assert f"{bad / 'expert.safetensors'}: sha256 does not match {bad / 'manifest.json'} (bytes {rec['parts'][0][0]}-" \
           in err[-1]


def test_a_nan_expert_is_found_by_the_child_before_any_byte(world, tmp_path, children, monkeypatch, capsys):
    nan = tmp_path / "pkg"
    nan.mkdir()
    for f in world["pkgs"][1].iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(nan / "expert.safetensors"))
    key = sorted(k for k in tensors if k.endswith("down_proj"))[-1]
    tensors[key].view(-1)[7] = math.nan
    save_file(tensors, str(nan / "expert.safetensors"))  # re-signed: the bytes are what the manifest says
    man = json.loads((nan / "manifest.json").read_text())
    man["files"]["expert.safetensors"] = sha256_file(nan / "expert.safetensors")
    (nan / "manifest.json").write_text(json.dumps(man))
    writes = []
    monkeypatch.setattr(native, "write_tensors", lambda *a, **k: writes.append(a) or {})
    rc = cli(["merge", str(world["public"]), str(world["pkgs"][0]), str(nan), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and writes == []
    assert err[-1].endswith(f"{nan / 'expert.safetensors'}: {key} holds NaN or Inf values; the expert is broken, "
                            "do not merge it")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_childs_value_check_finds_a_nan_split_between_reads(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(digests, "CHUNK", 7)  # reads that split elements
    for bad_at in (None, 0, 13, 99):
        t = torch.linspace(-1, 1, 100).to(dtype)
        if bad_at is not None:
            t[bad_at] = math.inf if bad_at % 2 else math.nan
        save_file({"a": torch.ones(3, dtype=torch.bfloat16), "w": t}, str(tmp_path / "f.safetensors"))
        rec = prehash._hash_one(str(tmp_path / "f.safetensors"), None, True)
        assert rec["nonfinite"] == ("" if bad_at is None else "w")
        assert rec["sha256"] == sha256_file(tmp_path / "f.safetensors")


def test_format_1_records_still_verify_and_old_packages_merge_the_same(world, tmp_path):
    out = merge(world["public"], world["pkgs"], tmp_path / "new")
    cfg, sd, meta = load_model_dir(out)
    # rewrite as an older flexmoe wrote it: whole-file sha256s, format-1 expert records
    old = dict(meta, format="flexmoe-model/1", files={n: sha256_file(out / n) for n in meta["files"]},
               experts=[{k: v for k, v in dict(e, tensor_sha256=expert_tensor_sha256(sd, j, cfg.num_layers, version=1)
                                                ).items() if k != "tensor_sha256_format"}
                        for j, e in enumerate(meta["experts"])])
    (out / "flexmoe.json").write_text(json.dumps(old))
    _, sd1, meta1 = load_model_dir(out)  # verifies the format-1 records
    assert meta1["experts"][1]["tensor_sha256"] != meta["experts"][1]["tensor_sha256"]
    # a format-1 record still binds its slot: a swapped expert is refused
    swapped = dict(old, experts=[old["experts"][0], dict(old["experts"][1], tensor_sha256=old["experts"][2]["tensor_sha256"]),
                                 old["experts"][2]])
    (out / "flexmoe.json").write_text(json.dumps(swapped))
    with pytest.raises(CheckpointError, match="slot 1 .* does not match its tensor_sha256"):
        load_model_dir(out)
    (out / "flexmoe.json").write_text(json.dumps(old))
    # remove-expert verifies format-1 records and binds the release in format 2
    rel = remove_expert(out, tmp_path / "rel", "code")
    _, sd2, meta2 = load_model_dir(rel)
    assert [e["tensor_sha256_format"] for e in meta2["experts"]] == [2, 2]
    assert torch.equal(sd2["layers.0.ffn.experts.down_proj"][1], sd1["layers.0.ffn.experts.down_proj"][2])
    # a package as an older flexmoe wrote it merges to the same weights and the same records
    olds = []
    for pkg in world["pkgs"]:
        dst = tmp_path / f"old-{pkg.name}"
        dst.mkdir()
        for f in pkg.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        man = json.loads((dst / "manifest.json").read_text())
        man.update(format="flexmoe-expert-package/1", files={"expert.safetensors": sha256_file(dst / "expert.safetensors")})
        (dst / "manifest.json").write_text(json.dumps(man))
        olds.append(dst)
    again = merge(world["public"], olds, tmp_path / "again")
    _, sd3, meta3 = load_model_dir(again)
    assert sorted(sd3) == sorted(sd) and all(torch.equal(sd3[k], sd[k]) for k in sd)
    assert [e["tensor_sha256"] for e in meta3["experts"]] == [e["tensor_sha256"] for e in meta["experts"]]
    assert meta3["files"] == meta["files"]


@pytest.mark.parametrize("entry,why", [
    ({"parts": []}, "must be a sha256 or"),
    ({"parts": [[0, "a" * 64]]}, "part 0"),
    ({"parts": [[5, "xyz"]]}, "part 0"),
    ({"parts": [[5, "a" * 64]], "size": 5}, "must be a sha256 or"),
    ("abc", "is not a sha256"),
])
def test_malformed_parts_entries_are_refused_in_one_line(world, tmp_path, entry, why, capsys):
    dst = tmp_path / "pkg"
    dst.mkdir()
    for f in world["pkgs"][0].iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["expert.safetensors"] = entry
    (dst / "manifest.json").write_text(json.dumps(man))
    rc = cli(["merge", str(world["public"]), str(dst), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(dst / "manifest.json") in err[0] and why in err[0]


def test_an_input_changed_after_its_parts_were_verified_is_refused(world, tmp_path, monkeypatch):
    """Bytes copied unhashed (their verified digests taken instead) must still be the bytes verified:
    a package rewritten during the copy is refused after the pass, and nothing is left."""
    import os

    copy = tmp_path / "pkg"
    copy.mkdir()
    for f in world["pkgs"][1].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    real, touched = FilePool.copy_into, []

    def rewrite_once(self, t, out):
        if not touched:
            touched.append(1)
            st = os.stat(copy / "expert.safetensors")  # same bytes, another mtime: as a rewrite would leave it
            os.utime(copy / "expert.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        yield from real(self, t, out)

    monkeypatch.setattr(FilePool, "copy_into", rewrite_once)
    with pytest.raises(CheckpointError, match=r"pkg/expert.safetensors: changed while it was being read"):
        merge(world["public"], [world["pkgs"][0], copy], tmp_path / "m")
    assert touched and not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp*"))


@pytest.mark.parametrize("reader", ["load_model_dir", "open_native"])
def test_readers_take_verified_parts_for_the_expert_records(world, tmp_path, monkeypatch, reader):
    """A verifying reader of a parts-recorded model hashes each byte once: every expert slot's digest
    comes from the part its file's check just verified; a swapped record is still refused."""
    import flexmoe.io.fingerprint as fingerprint
    import flexmoe.io.model_dir as model_dir

    merge(world["public"], world["pkgs"], tmp_path / "m", max_shard_size="40KB")
    hits = []
    real = fingerprint.parts_leaves

    def spy(files, tensors):
        leaf = real(files, tensors)
        return lambda key, slot: hits.append(leaf(key, slot)) or hits[-1]

    monkeypatch.setattr(model_dir, "parts_leaves", spy)
    monkeypatch.setattr(native, "parts_leaves", spy)
    read = load_model_dir if reader == "load_model_dir" else native.open_native
    cfg = read(tmp_path / "m")[0]
    assert len(hits) == cfg.num_experts * 4 * cfg.num_layers and all(hits)  # 3 FFN weights + router row
    meta = _meta(tmp_path / "m")
    meta["experts"][1]["tensor_sha256"], meta["experts"][2]["tensor_sha256"] = \
        meta["experts"][2]["tensor_sha256"], meta["experts"][1]["tensor_sha256"]
    (tmp_path / "m" / "flexmoe.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expert slot 1 .* does not match its tensor_sha256"):
        read(tmp_path / "m")


def test_a_weight_file_changed_between_its_check_and_its_load_is_refused(world, tmp_path, monkeypatch):
    import os

    import flexmoe.io.model_dir as model_dir

    merge(world["public"], world["pkgs"], tmp_path / "m", max_shard_size="40KB")
    real = model_dir.verify_files

    def then_touch(src, meta, defer=None):
        real(src, meta, defer)
        shard = src / _shards(src)[0]
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))

    monkeypatch.setattr(model_dir, "verify_files", then_touch)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        load_model_dir(tmp_path / "m")


@pytest.mark.parametrize("window", [4096, 3 * 4096, 1 << 26])
def test_mapped_reads_hash_what_plain_reads_hash(world, monkeypatch, window):
    """io.prehash's children read through mmap windows (resident memory: one window): every digest,
    the short/long verdicts and the bytes a visitor sees must be the plain reader's."""
    monkeypatch.setattr(digests.Reader, "WINDOW", window)
    path = world["pkgs"][0] / "expert.safetensors"
    lengths = digests.part_lengths(json.loads((world["pkgs"][0] / "manifest.json").read_text())["files"][path.name])
    seen = {True: bytearray(), False: bytearray()}
    for mapped in (True, False):
        def visit(offset, view, mapped=mapped):
            assert offset == len(seen[mapped])
            seen[mapped] += view
        got = digests.hash_file(path, lengths, visit=visit, mapped=mapped)
        assert got == digests.hash_file(path, lengths) and digests.hash_file(path, mapped=mapped) == sha256_file(path)
        assert digests.hash_file(path, lengths[:-1], mapped=mapped)[-1] == "long"
        assert digests.hash_file(path, lengths + [8], mapped=mapped)[-1] == "short"
    assert seen[True] == seen[False] == path.read_bytes()


def test_format_2_expert_records_hash_no_slot_twice(world, tmp_path, monkeypatch):
    """remove-expert and import-hf bind (and check) format-2 records from the per-slot digests of the
    file's parts entry: the expert tap hashes no byte of its own. A format-1 source still needs it."""
    from flexmoe.convert.hf_export import export_hf
    from flexmoe.convert.hf_import import import_hf
    from flexmoe.io.taps import ExpertHashTap

    hashed = []
    real = ExpertHashTap.slot

    def spy(self, name, j, at, data, jobs):  # the hash updates the tap queues
        before = len(jobs)
        real(self, name, j, at, data, jobs)
        hashed.append(len(jobs) - before)

    monkeypatch.setattr(ExpertHashTap, "slot", spy)
    out = merge(world["public"], world["pkgs"], tmp_path / "m", max_shard_size="40KB")
    rel = remove_expert(out, tmp_path / "rel", "code")
    export_hf(out, tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert len(hashed) > 0 and sum(hashed) == 0  # shown the bytes (another tap wanted them), hashed none
    for d, n in ((rel, 2), (back, 3)):
        _, sd, meta = load_model_dir(d)  # every new record verified against the tensors
        assert [e["tensor_sha256_format"] for e in meta["experts"]] == [2] * n
    # the same model with format-1 records: remove-expert hashes the slots to check them
    cfg, sd, meta = load_model_dir(out)
    old = dict(meta, experts=[{k: v for k, v in dict(e, tensor_sha256=expert_tensor_sha256(
        sd, j, cfg.num_layers, version=1)).items() if k != "tensor_sha256_format"} for j, e in enumerate(meta["experts"])])
    (out / "flexmoe.json").write_text(json.dumps(old))
    remove_expert(out, tmp_path / "rel1", "code")
    assert sum(hashed) > 0
    bad = dict(old, experts=[old["experts"][0], old["experts"][1], dict(old["experts"][2], tensor_sha256="0" * 64)])
    (out / "flexmoe.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="slot 2 .* does not match its tensor_sha256"):
        remove_expert(out, tmp_path / "rel2", "code")
