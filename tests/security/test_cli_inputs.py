"""Bad inputs to data, training, evaluation and the CLI itself (issue 13): each is refused with exit
code 2, one line naming the file or setting, no traceback, and nothing left at the destination.

Every case but `flexmoe train`'s runs in-process (`run_cli`); the train cases need Hydra's own
process (`run_cli_subprocess`) and are kept few and tiny. One valid world is built per module: a
small corpus, data prepared from it (bytes, and two byte-level BPEs), a tiny public model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from security_harness import assert_refused, snapshot
from safetensors.torch import save_file

from flexmoe.config.model import ModelConfig
from flexmoe.data import ByteTokenizer, prepare_data, train_bpe
from flexmoe.io.files import sha256_file
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from helpers import make_public

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_seq_len=128)
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


class _Canary:
    """Unpickling this creates the canary file: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_canary(path: Path, canary: Path) -> Path:
    path.write_bytes(pickle.dumps(_Canary(str(canary))))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(TEXT)
    (root / "corpus" / "b.txt").write_text(TEXT.upper())
    prepare_data([root / "corpus"], root / "data", ByteTokenizer(), progress=False)
    public = make_public(root, CFG)
    cfg, sd, meta = load_model_dir(public)
    plain = {k: v for k, v in meta.items() if k not in ("router_embedding", "files", "format")}
    save_model_dir(root / "public-bytes", cfg, sd, dict(plain, tokenizer="bytes"))
    for vocab in (258, 300):  # 258: another tokenizer of the same size; 300: ids past the model's vocabulary
        tok = train_bpe([TEXT, TEXT.upper()], vocab, root / f"bpe{vocab}")
        prepare_data([root / "corpus"], root / f"data-bpe{vocab}", tok, progress=False)
    return {"root": root, "corpus": root / "corpus", "data": root / "data", "public": public,
            "public-bytes": root / "public-bytes", "rows": root / "public_rows.safetensors",
            "data-bpe258": root / "data-bpe258", "data-bpe300": root / "data-bpe300"}


def _edit(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _set(key, value):
    return lambda d: _edit(d / "manifest.json", lambda m: m.__setitem__(key, value))


def _shard(key, value):
    return lambda d: _edit(d / "manifest.json", lambda m: m["shards"][0].__setitem__(key, value))


def _replace_shard(array_fn, manifest_fn=None):
    """Replace shard 0 by another array, re-hashed as a forger would (only deeper checks can tell)."""
    def apply(d):
        f = d / "shard-00000.npy"
        arr = array_fn(np.load(f))
        if isinstance(arr, bytes):
            f.write_bytes(arr)
        else:
            np.save(f, arr)

        def fix(m):
            m["shards"][0]["sha256"] = sha256_file(f)
            if manifest_fn:
                manifest_fn(m)
        _edit(d / "manifest.json", fix)
    return apply


def _outside_shard(absolute: bool):
    def apply(d):
        outside = d.parent / "outside.npy"
        shutil.copy(d / "shard-00000.npy", outside)
        _shard("path", str(outside) if absolute else "../outside.npy")(d)
    return apply


def _symlinked_shard(d):
    outside = d.parent / "outside.npy"
    (d / "shard-00000.npy").rename(outside)
    (d / "shard-00000.npy").symlink_to(outside)


def _symlinked_manifest(d):
    (d / "manifest.json").rename(d.parent / "elsewhere.json")
    (d / "manifest.json").symlink_to(d.parent / "elsewhere.json")


def _twice(d):
    _edit(d / "manifest.json", lambda m: (m["shards"].append(dict(m["shards"][0])),
                                          m.__setitem__("num_tokens", 2 * m["num_tokens"])))


def _pickled_shard(d):
    return _replace_shard(lambda a: pickle.dumps(_Canary(str(d.parent / "canary"))))(d)


M, S = "manifest.json", "shard-00000.npy"
# name: (mutation of a copy of a valid prepared directory, the file the refusal must name)
DATA_CASES = {
    "shard-dotdot": (_outside_shard(False), M),
    "shard-absolute": (_outside_shard(True), M),
    "shard-symlink-out": (_symlinked_shard, S),
    "shard-backslash": (_shard("path", "sub\\shard.npy"), M),
    "shard-empty-path": (_shard("path", ""), M),
    "format-v2": (_set("format", "flexmoe-tokens/2"), M),
    "format-missing": (lambda d: _edit(d / M, lambda m: m.pop("format")), M),
    "manifest-list": (lambda d: (d / M).write_text("[1, 2]"), M),
    "manifest-not-json": (lambda d: (d / M).write_text("{not json"), M),
    "manifest-missing": (lambda d: (d / M).unlink(), M),
    "manifest-symlink": (_symlinked_manifest, M),
    "shards-string": (_set("shards", "shard-00000.npy"), M),
    "shards-empty": (_set("shards", []), M),
    "shards-missing": (lambda d: _edit(d / M, lambda m: m.pop("shards")), M),
    "shard-not-object": (_set("shards", ["shard-00000.npy"]), M),
    "shard-num-tokens-str": (_shard("num_tokens", "many"), M),
    "shard-num-tokens-neg": (_shard("num_tokens", -1), M),
    "shard-sha-int": (_shard("sha256", 5), M),
    "shard-sha-short": (_shard("sha256", "abc"), M),
    "dtype-float": (_set("dtype", "float32"), M),
    "dtype-int": (_set("dtype", 7), M),
    "tokenizer-missing": (lambda d: _edit(d / M, lambda m: m.pop("tokenizer")), M),
    "tokenizer-string": (_set("tokenizer", "bytes"), M),
    "tokenizer-type": (_set("tokenizer", {"type": "sentencepiece"}), M),
    "tokenizer-vocab-neg": (_set("tokenizer", {"type": "bytes", "vocab_size": -1}), M),
    "num-tokens-str": (_set("num_tokens", "lots"), M),
    "num-tokens-mismatch": (_set("num_tokens", 5), M),
    "shard-twice": (_twice, M),
    "shard-missing": (lambda d: (d / S).unlink(), S),
    "shard-corrupted": (lambda d: (d / S).write_bytes((d / S).read_bytes()[:-1] + b"\x00"), S),
    "shard-pickle": (_pickled_shard, S),
    "shard-2d": (_replace_shard(lambda a: a[: len(a) // 2 * 2].reshape(2, -1)), S),
    "shard-int64": (_replace_shard(lambda a: a.astype(np.int64)), S),
    "shard-truncated": (_replace_shard(lambda a: b"\x93NUMPY\x01\x00"), S),
    "token-past-vocab": (_replace_shard(lambda a: np.where(np.arange(len(a)) == 3, 300, a).astype(np.uint16)), S),
    "too-few-tokens": (_replace_shard(lambda a: a[:5], lambda m: (m.__setitem__("num_tokens", 5),
                                                                  m["shards"][0].__setitem__("num_tokens", 5))), "data"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_directory_is_refused(case, w, tmp_path, run_cli):
    mutate, named = DATA_CASES[case]
    d = shutil.copytree(w["data"], tmp_path / "data")
    mutate(d)
    r = run_cli(["eval", w["public"], "--data", f"x={d}", "--seq-len", "16", "--num-windows", "2"])
    assert_refused(r, str(d if named == "data" else d / named))
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


def _sft_array(name, fn):
    """Replace one array of an SFT directory and rewrite its sha256, as a forger would."""
    def apply(d):
        f = d / name
        new = fn(np.load(f), d)
        f.write_bytes(new) if isinstance(new, bytes) else np.save(f, new)
        _edit(d / M, lambda m: m["files"].__setitem__(name, sha256_file(f)))
    return apply


SFT_CASES = {
    "format-v2": (lambda d: _edit(d / M, lambda m: m.__setitem__("format", "flexmoe-sft/2")), M),
    "files-dotdot": (lambda d: _edit(d / M, lambda m: m["files"].__setitem__("../x.npy", "0" * 64)), M),
    "files-not-object": (lambda d: _edit(d / M, lambda m: m.__setitem__("files", ["tokens.npy"])), M),
    "num-tokens-str": (lambda d: _edit(d / M, lambda m: m.__setitem__("num_tokens", "many")), M),
    "tokens-symlink": (lambda d: ((d / "tokens.npy").rename(d.parent / "t.npy"),
                                  (d / "tokens.npy").symlink_to(d.parent / "t.npy")), "tokens.npy"),
    "tokens-pickle": (_sft_array("tokens.npy", lambda a, d: pickle.dumps(_Canary(str(d.parent / "canary")))),
                      "tokens.npy"),
    "mask-short": (_sft_array("loss_mask.npy", lambda a, d: a[:-3]), "sft"),
    "doc-starts-past-end": (_sft_array("doc_starts.npy", lambda a, d: np.append(a, 10**9)), "sft"),
    "tokens-float": (_sft_array("tokens.npy", lambda a, d: a.astype(np.float32)), "sft"),
}


@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_bad_sft_directory_is_refused(case, tmp_path):
    """SFT data (`prepare-data --format sft`) is read only by training: the reader itself refuses
    with a DataError naming the file, and never unpickles."""
    from flexmoe.data import DataError
    from flexmoe.data.sft import SFTWindows, prepare_sft

    chats = [{"messages": [{"role": "user", "content": f"what is {i}+{i}?"},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, chats)) + "\n")
    d = tmp_path / "sft"
    prepare_sft([tmp_path / "chat.jsonl"], d, ByteTokenizer())
    SFTWindows(d, 16)  # valid before the edit
    mutate, named = SFT_CASES[case]
    mutate(d)
    with pytest.raises(DataError) as e:
        SFTWindows(d, 16)
    assert str(d if named == "sft" else d / named) in str(e.value)
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


# --- prepare-data ------------------------------------------------------------------------------

PREPARE_CASES = {
    # name: (argv after `prepare-data`, with IN/OUT/T placeholders; files to create; what the last line names)
    "out-is-input-dir": (["IN", "--out", "IN", "--overwrite"], {}, "IN"),
    "input-inside-out": (["IN/a.txt", "--out", "IN", "--overwrite"], {}, "IN"),
    "out-inside-input": (["IN", "--out", "IN/shards"], {}, "IN/shards"),
    "out-not-empty": (["IN/a.txt", "--out", "T/full"], {"full/x": "x"}, "--overwrite"),
    "out-is-file": (["IN/a.txt", "--out", "T/afile"], {"afile": "x"}, "T/afile"),
    "out-under-file": (["IN/a.txt", "--out", "T/afile/sub"], {"afile": "x"}, "T/afile"),
    "input-missing": (["T/nope.txt", "--out", "OUT"], {}, "T/nope.txt"),
    "input-dir-empty": (["T/empty", "--out", "OUT"], {"empty/.hidden": "x"}, "T/empty"),
    "input-not-utf8": (["T/bin.txt", "--out", "OUT"], {"bin.txt": b"ok \xff\xfe\xfd"}, "T/bin.txt"),
    "input-only-space": (["T/blank.txt", "--out", "OUT"], {"blank.txt": "  \n\n "}, "T/blank.txt"),
    "jsonl-bad-line": (["IN/a.txt", "T/d.jsonl", "--out", "OUT"], {"d.jsonl": '{"text": "a"}\n{oops\n'}, "T/d.jsonl:2"),
    "jsonl-array": (["T/d.jsonl", "--out", "OUT"], {"d.jsonl": "[1, 2]\n"}, "T/d.jsonl:1"),
    "jsonl-text-int": (["T/d.jsonl", "--out", "OUT"], {"d.jsonl": '{"text": 5}\n'}, "T/d.jsonl:1"),
    "jsonl-no-text": (["T/d.jsonl", "--out", "OUT"], {"d.jsonl": '{"body": "x"}\n'}, "text"),
    "json-file": (["T/d.json", "--out", "OUT"], {"d.json": '{"text": "x"}'}, "T/d.json"),
    "csv-not-utf8": (["T/d.csv", "--out", "OUT"], {"d.csv": b"a,b\nx,\xff\xfe\n"}, "T/d.csv"),
    "tokenizer-missing": (["IN/a.txt", "--out", "OUT", "--tokenizer", "T/notok"], {}, "T/notok"),
    "tokenizer-corrupt": (["IN/a.txt", "--out", "OUT", "--tokenizer", "T/tok"], {"tok/tokenizer.json": "{bad"},
                          "T/tok/tokenizer.json"),
    "tokenizer-config-bad": (["IN/a.txt", "--out", "OUT", "--tokenizer", "T/tok"],
                             {"tok/tokenizer.json": "COPY", "tok/tokenizer_config.json": '{"eos_token": "<nope>"}'},
                             "T/tok/tokenizer_config.json"),
    "bpe-too-small": (["IN/a.txt", "--out", "OUT", "--train-bpe", "100", "--tokenizer", "T/newtok"], {}, "--train-bpe"),
    "bpe-into-bytes": (["IN/a.txt", "--out", "OUT", "--train-bpe", "300"], {}, "--train-bpe"),
    "bpe-tokenizer-in-input": (["IN", "--out", "OUT", "--train-bpe", "300", "--tokenizer", "IN/tok"], {}, "--tokenizer"),
    "sft-not-object": (["T/c.jsonl", "--out", "OUT", "--format", "sft"], {"c.jsonl": "[1]\n"}, "T/c.jsonl:1"),
    "sft-message-not-object": (["T/c.jsonl", "--out", "OUT", "--format", "sft"],
                               {"c.jsonl": '{"messages": ["hi"]}\n'}, "T/c.jsonl:1"),
    "sft-bad-role": (["T/c.jsonl", "--out", "OUT", "--format", "sft"],
                     {"c.jsonl": '{"messages": [{"role": "root", "content": "x"}]}\n'}, "T/c.jsonl:1"),
    "sft-with-dtype": (["T/c.jsonl", "--out", "OUT", "--format", "sft", "--dtype", "uint16"],
                       {"c.jsonl": '{"messages": []}\n'}, "--dtype"),
    "sft-out-is-input": (["T/c.jsonl", "--out", "T/c.jsonl", "--format", "sft", "--overwrite"],
                         {"c.jsonl": '{"messages": [{"role": "user", "content": "x"}]}\n'}, "T/c.jsonl"),
    "bad-dtype-choice": (["IN/a.txt", "--out", "OUT", "--dtype", "int8"], {}, "--dtype"),
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_bad_prepare_data_is_refused(case, w, tmp_path, run_cli):
    argv, files, named = PREPARE_CASES[case]
    inp = shutil.copytree(w["corpus"], tmp_path / "in")
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content == "COPY":
            shutil.copy(w["root"] / "bpe258" / "tokenizer.json", p)
        else:
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)

    def sub(s):
        return s.replace("IN", str(inp)).replace("OUT", str(tmp_path / "out")).replace("T/", f"{tmp_path}/")

    out = Path(sub(argv[argv.index("--out") + 1]))
    before = {p: snapshot(p) for p in (inp, out, tmp_path / "newtok", inp / "tok")}
    r = run_cli(["prepare-data", *map(sub, argv)])
    assert_refused(r, sub(named), dest=out, before=before[out])
    assert all(snapshot(p) == b for p, b in before.items()), "an input or output changed"
    assert "overwrite=True" not in r.err


def test_prepare_data_names_the_real_overwrite_flag(w, tmp_path, run_cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    r = run_cli(["prepare-data", w["corpus"], "--out", tmp_path / "out"])
    assert_refused(r, "pass --overwrite", dest=tmp_path / "out", before=snapshot(tmp_path / "out"))


@pytest.mark.parametrize("code,name,needle", [
    (errno.ENOSPC, "ENOSPC", "no space left"),
    (errno.EACCES, "EACCES", "permission denied"),
    (errno.EROFS, "EROFS", "read-only"),
])
def test_os_errors_while_writing_are_one_line(code, name, needle, w, tmp_path, run_cli, monkeypatch):
    """A full disk, a denied or read-only output: the shard write fails; one line names the file."""
    import flexmoe.data.prepare as prep

    def fail(path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(prep.np, "save", fail)
    out = tmp_path / "out"
    r = run_cli(["prepare-data", w["corpus"], "--out", out])
    assert_refused(r, [needle], dest=out)
    assert "shard-00000.npy" in r.last_line and not list(tmp_path.glob(".out.*"))


# --- eval / generate / router-embed / branch / audit-extraction -----------------------------------

def _nan_model(w, tmp_path):
    """Finite weights whose logits overflow to inf (so the perplexity is nan)."""
    cfg, sd, meta = load_model_dir(w["public"])
    sd = {k: (v * 1e37 if "embed" in k or "lm_head" in k or "norm" in k else v) for k, v in sd.items()}
    plain = {k: v for k, v in meta.items() if k not in ("router_embedding", "files", "format")}
    return save_model_dir(tmp_path / "nan-model", cfg, sd, plain)


def _rows(w, tmp_path, **tensors):
    f = tmp_path / "rows.safetensors"
    save_file(tensors, str(f))
    return f


def _arg(w, tmp_path, name):
    """Named inputs of the command table, made on demand inside tmp_path."""
    if name == "rows-truncated":
        f = tmp_path / "rows.safetensors"
        f.write_bytes(w["rows"].read_bytes()[:40])
        return f
    if name == "rows-dir":
        (tmp_path / "rows").mkdir()
        return tmp_path / "rows"
    if name == "rows-notensor":
        return _rows(w, tmp_path, foo=torch.zeros(2))
    if name == "rows-shape":
        return _rows(w, tmp_path, router_embedding=torch.zeros(3, 7))
    if name == "rows-nan":
        return _rows(w, tmp_path, router_embedding=torch.full((CFG.num_layers, CFG.d_model), math.nan))
    if name == "rows-int":
        return _rows(w, tmp_path, router_embedding=torch.zeros(CFG.num_layers, CFG.d_model, dtype=torch.int32))
    if name == "rows-pickle":
        return pickle_canary(tmp_path / "rows.pt", tmp_path / "canary")
    if name == "dirfile":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile"
    if name == "prompt-dir":
        (tmp_path / "pdir").mkdir()
        return tmp_path / "pdir"
    if name == "prompt-binary":
        (tmp_path / "p.bin").write_bytes(b"\xff\xfe\x00abc")
        return tmp_path / "p.bin"
    if name == "nonempty":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        return tmp_path / "full"
    if name == "public-copy":
        return shutil.copytree(w["public"], tmp_path / "pub")
    return w[name] if name in w else tmp_path / name


CMD_CASES = {
    # name: (argv with {placeholders} for _arg, destination placeholder or None, what the last line names)
    "eval-num-windows-0": (["eval", "{public}", "--data", "x={data}", "--num-windows", "0"], None, "--num-windows"),
    "eval-seq-len-0": (["eval", "{public}", "--data", "x={data}", "--seq-len", "0"], None, "--seq-len"),
    "eval-seq-len-past-model": (["eval", "{public}", "--data", "x={data}", "--seq-len", "4096"], None, "--seq-len"),
    "eval-data-no-name": (["eval", "{public}", "--data", "{data}"], None, "--data"),
    "eval-data-twice": (["eval", "{public}", "--data", "x={data}", "--data", "x={data}", "--seq-len", "16"], None,
                        "--data"),
    "eval-data-is-file": (["eval", "{public}", "--data", "x={dirfile}"], None, "{dirfile}"),
    "eval-other-tokenizer": (["eval", "{public-bytes}", "--data", "x={data-bpe258}", "--seq-len", "16"], None,
                             "--data x={data-bpe258}"),
    "eval-vocab-past-model": (["eval", "{public}", "--data", "x={data-bpe300}", "--seq-len", "16"], None,
                              "--data x={data-bpe300}"),
    "generate-prompt-dir": (["generate", "{public}", "--prompt-file", "{prompt-dir}", "--tokenizer", "bytes"], None,
                            "--prompt-file"),
    "generate-prompt-missing": (["generate", "{public}", "--prompt-file", "{nofile}", "--tokenizer", "bytes"], None,
                                "--prompt-file"),
    "generate-prompt-binary": (["generate", "{public}", "--prompt-file", "{prompt-binary}", "--tokenizer", "bytes"],
                               None, "--prompt-file"),
    "generate-temperature-nan": (["generate", "{public}", "--prompt", "hi", "--temperature", "nan"], None,
                                 "--temperature"),
    "generate-samples-0": (["generate", "{public}", "--prompt", "hi", "--num-samples", "0"], None, "--num-samples"),
    "generate-tokenizer-past-vocab": (["generate", "{public}", "--prompt", "the quick brown fox", "--tokenizer",
                                       "{root}/bpe300"], None, "--tokenizer"),
    "branch-rows-truncated": (["branch", "{public}", "{out}", "--router-embedding", "{rows-truncated}"], "{out}",
                              "--router-embedding"),
    "branch-rows-dir": (["branch", "{public}", "{out}", "--router-embedding", "{rows-dir}"], "{out}",
                        "--router-embedding"),
    "branch-rows-missing": (["branch", "{public}", "{out}", "--router-embedding", "{nofile}"], "{out}",
                            "--router-embedding"),
    "branch-rows-no-tensor": (["branch", "{public}", "{out}", "--router-embedding", "{rows-notensor}"], "{out}",
                              "--router-embedding"),
    "branch-rows-shape": (["branch", "{public}", "{out}", "--router-embedding", "{rows-shape}"], "{out}",
                          "--router-embedding"),
    "branch-rows-nan": (["branch", "{public}", "{out}", "--router-embedding", "{rows-nan}"], "{out}",
                        "--router-embedding"),
    "branch-rows-int": (["branch", "{public}", "{out}", "--router-embedding", "{rows-int}"], "{out}",
                        "--router-embedding"),
    "branch-rows-pickle": (["branch", "{public}", "{out}", "--router-embedding", "{rows-pickle}"], "{out}",
                           "--router-embedding"),
    "branch-out-is-public": (["branch", "{public-copy}", "{public-copy}"], "{public-copy}", "OUT"),
    "branch-out-in-public": (["branch", "{public-copy}", "{public-copy}/anchor"], "{public-copy}", "OUT"),
    "branch-out-is-file": (["branch", "{public}", "{dirfile}"], "{dirfile}", "{dirfile}"),
    "branch-out-not-empty": (["branch", "{public}", "{nonempty}"], "{nonempty}", "choose another directory"),
    "router-embed-out-in-data": (["router-embed", "--model", "{public}", "--data", "{data}", "--out",
                                  "{data}/rows.safetensors"], "{data}", "--out"),
    "router-embed-out-is-weights": (["router-embed", "--model", "{public-copy}", "--data", "{data}", "--out",
                                     "{public-copy}/model.safetensors"], "{public-copy}", "--out"),
    "router-embed-out-is-dir": (["router-embed", "--model", "{public}", "--data", "{data}", "--out", "{nonempty}"],
                                "{nonempty}", "--out"),
    "router-embed-out-under-file": (["router-embed", "--model", "{public}", "--data", "{data}", "--out",
                                     "{dirfile}/rows.safetensors"], "{dirfile}", "--out"),
    "router-embed-windows-0": (["router-embed", "--model", "{public}", "--data", "{data}", "--out", "{out}",
                                "--num-windows", "0"], "{out}", "--num-windows"),
    "router-embed-vocab": (["router-embed", "--model", "{public}", "--data", "{data-bpe300}", "--out", "{out}",
                            "--seq-len", "16"], "{out}", "--data"),
    "router-embed-seq-len": (["router-embed", "--model", "{public}", "--data", "{data}", "--out", "{out}",
                              "--seq-len", "512"], "{out}", "--seq-len"),
    "audit-out-in-data": (["audit-extraction", "--data", "{data}", "--public", "{public}", "--out",
                           "{data}/report.json"], "{data}", "--out"),
    "audit-max-docs-0": (["audit-extraction", "--data", "{data}", "--public", "{public}", "--max-docs", "0",
                          "--out", "{out}"], "{out}", "--max-docs"),
    "audit-vocab": (["audit-extraction", "--data", "{data-bpe300}", "--public", "{public}", "--out", "{out}",
                     "--samples", "0", "--max-docs", "2"], "{out}", "--data"),
    "unknown-command": (["frobnicate"], None, "frobnicate"),
}


@pytest.mark.parametrize("case", sorted(CMD_CASES))
def test_bad_command_input_is_refused(case, w, tmp_path, run_cli):
    argv, dest, named = CMD_CASES[case]
    made: dict[str, Path] = {}

    def sub(s: str) -> str:
        def one(m):
            key = m.group(1)
            if key not in made:
                made[key] = _arg(w, tmp_path, key)
            return str(made[key])
        return re.sub(r"\{([a-z0-9-]+)\}", one, s)

    argv = [sub(a) for a in argv]
    dest = Path(sub(dest)) if dest else None
    before = snapshot(dest) if dest else None
    data_before = snapshot(w["data"])
    r = run_cli(argv)
    assert_refused(r, sub(named), dest=dest, before=before)
    assert snapshot(w["data"]) == data_before
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


def test_eval_non_finite_perplexity_is_null_and_stdout_stays_json(w, tmp_path, run_cli):
    model = _nan_model(w, tmp_path)
    r = run_cli(["eval", model, "--data", f"x={w['data']}", "--seq-len", "16", "--num-windows", "2"])
    assert_refused(r, str(model))
    out = json.loads(r.out)  # strict JSON: NaN would not parse with parse_constant refusing it
    json.loads(r.out, parse_constant=lambda c: pytest.fail(f"{c} in stdout"))
    assert out["perplexity"]["model"]["x"] is None and "not finite" in r.last_line


def test_eval_perplexity_is_at_least_one(w, run_cli):
    r = run_cli(["eval", w["public"], "--data", f"x={w['data']}", "--seq-len", "16", "--num-windows", "1"])
    assert r.rc == 0, r.err
    assert json.loads(r.out)["perplexity"]["model"]["x"] >= 1.0


# --- the CLI itself -------------------------------------------------------------------------------

def test_debug_flag_shows_the_traceback(w, tmp_path, run_cli):
    with pytest.raises(ValueError, match="--num-windows|--prompt-file"):
        run_cli(["--debug", "generate", w["public"], "--prompt-file", tmp_path, "--tokenizer", "bytes"])
    assert "FLEXMOE_DEBUG" not in os.environ  # --debug does not leak into later commands of this process
    r = run_cli(["generate", w["public"], "--prompt-file", tmp_path, "--tokenizer", "bytes"])
    assert_refused(r, "--prompt-file")


def test_stale_temp_folders_of_killed_runs_are_cleaned(w, tmp_path, run_cli):
    """A killed run leaves `.NAME.tmp-*` beside its output: the next run that writes there removes
    the ones of dead processes on this machine and names the ones it cannot tell."""
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-999999999@{host}@abc"
    other_host = tmp_path / ".out.tmp-123@elsewhere@abc"
    legacy = tmp_path / ".out.tmp-k2j3h4"
    for d in (dead, other_host, legacy):
        d.mkdir()
        (d / "shard-00000.npy").write_bytes(b"half")
    r = run_cli(["prepare-data", w["corpus"], "--out", tmp_path / "out"])
    assert r.rc == 0, r.err
    assert not dead.exists() and other_host.exists() and legacy.exists()
    assert str(legacy) in r.err and str(other_host) in r.err and dead.name in r.err
    for d in (other_host, legacy):
        shutil.rmtree(d)
    # model directories (branch) go through the same writer
    stale = tmp_path / f".anchor.tmp-999999999@{host}@x"
    stale.mkdir()
    r = run_cli(["branch", w["public"], tmp_path / "anchor", "--router-embedding", w["rows"]])
    assert r.rc == 0, r.err
    assert not stale.exists() and (tmp_path / "anchor" / "model.safetensors").is_file()


# --- flexmoe train (Hydra: one process per case) --------------------------------------------------

def _small_data_dir(w, tmp_path, mutate=None):
    d = shutil.copytree(w["data"], tmp_path / "d")
    if mutate:
        mutate(d)
    return d


TRAIN_CASES = {
    # name: (overrides, what the last line names); DATA is a valid byte-level directory
    "unknown-key": (["trainer.nosuchkey=1"], "trainer.nosuchkey"),
    "missing-group": (["model=nosuch"], "model/nosuch"),
    "wrong-type": (["trainer.steps=abc"], "trainer.steps"),
    "bad-grammar": (["trainer.steps=["], "trainer.steps=["),
    "steps-negative": (["trainer.steps=-5"], "trainer.steps"),
    "seq-len-past-model": (["data.seq_len=2048"], "data.seq_len"),
    "d-model-negative": (["model.d_model=-32"], "model.d_model"),
    "heads-zero": (["model.num_heads=0"], "model.num_heads"),
    "lr-nan": (["optim.lr=nan"], "optim.lr"),
    "vocab-past-model": (["model.vocab_size=200"], "data.train.x"),
    "other-tokenizer": (["tokenizer=bytes", "data.train.x={data-bpe258}"], "data.train.x"),
    "shard-dotdot": (["data.train.x={dotdot}"], "manifest.json"),
    "init-from-seq-len": (["init_from={public}", "data.seq_len=256"], "data.seq_len"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_train_setting_is_refused(case, w, tmp_path, run_cli_subprocess):
    overrides, named = TRAIN_CASES[case]
    extra = {"dotdot": lambda: _small_data_dir(w, tmp_path, _outside_shard(False))}
    values = {k: str(v) for k, v in w.items()}

    def sub(s):
        for k in sorted(extra, key=len, reverse=True):
            if "{" + k + "}" in s:
                s = s.replace("{" + k + "}", str(extra[k]()))
        for k in sorted(values, key=len, reverse=True):
            s = s.replace("{" + k + "}", values[k])
        return s

    out = tmp_path / "run"
    argv = ["train", f"out_dir={out}", "model.d_model=32", "model.num_layers=1", "model.d_ff=64",
            "data.seq_len=32", "data.batch_size=2", "trainer.steps=2", f"+data.train.x={w['data']}"]
    argv += [sub(o) for o in overrides]
    r = run_cli_subprocess(argv, timeout=90)
    assert_refused(r, sub(named), dest=out)
