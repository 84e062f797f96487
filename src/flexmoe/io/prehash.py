"""Hash a command's input files in child processes while the command starts and copies.

A merge must check every input byte against the sha256 its manifest records. Hashed in the
pass that copies the bytes, that is one more sha256 per byte on the copy's critical path; hashed
in a thread of this process while it imports torch, it slows the import down (measured here:
2.5 s alone, 5.2 s beside one hashing thread: both want the GIL). Child processes hash on other
cores with no lock to share, and start before the command imports torch.

A file's digest is used only if the file is unchanged when the command uses it: the child
records (size, mtime_ns, inode, device) before and after reading, and `Prehash.digest` compares
them with the file as it is when asked, which `FilePool.check_expected` does after the copy. A
file rewritten while a command reads it is refused rather than trusted (the same quick check
make and rsync rely on).

    python -m flexmoe.io.prehash FILE...   (the child: one JSON line per file hashed)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from flexmoe.io.errors import CheckpointError

CHUNK = 1 << 24
MAX_WORKERS = 8
INLINE_BYTES = 64 << 20  # inputs up to this size are hashed in this process, before torch is imported


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM job's allocation, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
_ACTIVE: "Prehash | None" = None


def _stat_key(path: str | Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _hash_one(path: str) -> dict:
    before = _stat_key(path)
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return {"path": path, "sha256": h.hexdigest(), "stat": before if _stat_key(path) == before else None}


class Prehash:
    """Digests of `paths`, computed by up to `workers` child processes (balanced by file size), or
    here and now when they total at most INLINE_BYTES (a child's start-up, ~0.15 s, would cost
    more than hashing them; measured: a tiny merge took 0.17 s with a child, 0.02 s without)."""

    def __init__(self, paths: list[Path], workers: int | None = None, fingerprint: list[Path] = ()):
        fingerprint = [Path(p).resolve() for p in fingerprint]
        size = {p: p.stat().st_size for p in {Path(p).resolve() for p in [*paths, *fingerprint]}}
        files = sorted(size, key=lambda p: -size[p])
        self._owner: dict[Path, subprocess.Popen | None] = {}
        self._done: dict[Path | str, dict] = {}
        self._procs: list[subprocess.Popen] = []
        self._fp_files, self._fp_proc = [str(p) for p in fingerprint], None
        if sum(size.values()) <= INLINE_BYTES:
            self._inline(files)
            return
        # One core stays with the parent, which imports torch and opens the inputs meanwhile; at most
        # MAX_WORKERS children (each holds a chunk and an interpreter, ~30 MB), which is about what
        # memory bandwidth feeds anyway.
        workers = max(1, min(workers or min(MAX_WORKERS, usable_cpus() - 1), len(files)))
        groups: list[list[Path]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for f in files:  # largest first onto the least-loaded child
            i = loads.index(min(loads))
            groups[i].append(f)
            loads[i] += size[f]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for group in filter(None, groups):
            # The fingerprint reads its files again: the child that hashes the first of them does it.
            extra = ["--fingerprint", *self._fp_files] if fingerprint and fingerprint[0] in group else []
            proc = subprocess.Popen([sys.executable, "-m", "flexmoe.io.prehash", *map(str, group), *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            self._procs.append(proc)
            self._owner.update({f: proc for f in group})
            self._fp_proc = proc if extra else self._fp_proc

    def _inline(self, files: list[Path]) -> None:
        for f in files:
            self._owner[f] = None
            try:
                self._done[f] = _hash_one(str(f))
            except OSError:
                pass  # the reader hashes it and reports what is wrong
        if self._fp_files:
            try:
                self._done["fingerprint"] = _fingerprint(self._fp_files)
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                pass  # the reader computes it

    def covers(self, path: Path) -> bool:
        """Whether a child hashes `path`."""
        return Path(path).resolve() in self._owner

    def _read_until(self, proc, done) -> None:
        while not done() and proc is not None and proc.stdout is not None:
            line = proc.stdout.readline()
            if not line:  # the child ended (or failed) without it
                return
            rec = json.loads(line)
            self._done[Path(rec["path"]) if "path" in rec else "fingerprint"] = rec

    def fingerprint(self, files: list[Path]) -> str | None:
        """io.fingerprint.fingerprint of the dense model whose weight files are `files`, if a child
        computed it (start's `fingerprint`) and none of them changed since; None otherwise."""
        if sorted(str(Path(p).resolve()) for p in files) != sorted(self._fp_files):
            return None
        self._read_until(self._fp_proc, lambda: "fingerprint" in self._done)
        rec = self._done.get("fingerprint")
        return rec["fingerprint"] if rec is not None else None

    def digest(self, path: Path) -> str | None:
        """The file's sha256 as a child read it; None if no child did (the caller hashes it itself).
        Refuses a file whose size, mtime, inode or device changed since. Waits for the child."""
        path = Path(path).resolve()
        self._read_until(self._owner.get(path), lambda: path in self._done)
        rec = self._done.get(path)
        if rec is None:
            return None
        try:
            unchanged = rec["stat"] is not None and rec["stat"] == _stat_key(path)
        except OSError:
            unchanged = False
        if not unchanged:
            raise CheckpointError(f"{path}: changed while it was being read; re-run once nothing writes to it")
        return rec["sha256"]

    def close(self) -> None:
        """Kill the children still running and reap them all."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()


def _plain(paths) -> list[Path]:
    return [Path(p) for p in paths if Path(p).is_file() and not Path(p).is_symlink()]


def start(paths: list[Path], fingerprint: list[Path] = ()) -> Prehash | None:
    """Begin hashing `paths` (those that are plain files) in child processes, and the fingerprint of the
    dense model whose weight files are `fingerprint`; the result is the one `active()` returns until
    `stop()`. None (and nothing started) when there is nothing to hash."""
    global _ACTIVE
    stop()
    files, fp = _plain(paths), _plain(fingerprint)
    if not files and not fp:
        return None
    _ACTIVE = Prehash(files, fingerprint=fp if len(fp) == len(fingerprint) else [])
    return _ACTIVE


def active() -> Prehash | None:
    """The running prehash (io.stream.FilePool consults it when told to expect a digest)."""
    return _ACTIVE


def known_fingerprint(tensors: dict) -> str | None:
    """The fingerprint a child computed of the model these lazy tensors (io.stream) are read from; None
    when none did."""
    pre = active()
    return pre.fingerprint({s.path for t in tensors.values() for s in t.spans}) if pre is not None else None


def stop() -> None:
    """Stop the children (if still running) and forget their results."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
    _ACTIVE = None


WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # io.shards' names


def listed_weight_files(directory: str | Path, listing: str, *, model: bool = False) -> list[Path]:
    """The `.safetensors` files that `directory/listing` (flexmoe.json or manifest.json) records a sha256
    for (with `model`, only a model's weight files), read leniently: an unreadable listing gives none,
    and the command's own checks report it."""
    directory = Path(directory)
    try:
        files = json.loads((directory / listing).read_text()).get("files") or {}
        return [directory / name for name in files if isinstance(name, str) and name.endswith(".safetensors")
                and "/" not in name and name not in ("", ".", "..") and (not model or WEIGHTS.fullmatch(name))]
    except (OSError, ValueError, AttributeError):
        return []


# torch's names of safetensors dtypes, as io.fingerprint's records spell them ("torch.float32")
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _fingerprint(files: list[str]) -> dict:
    """io.fingerprint.fingerprint of the dense model whose weights are `files`, read without torch;
    None when the files hold what this reader does not handle (the parent computes it then)."""
    from flexmoe.config.model import NATIVE_BUFFERS
    from flexmoe.io.keys import is_router_key, parse_experts_key

    stats = {f: _stat_key(f) for f in files}
    spans = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for key, e in header.items():
            if parse_experts_key(key) or e["dtype"] not in _TORCH_NAMES:
                return {"fingerprint_of": files, "fingerprint": None}  # an MoE: not a public model
            if not (is_router_key(key) or key in NATIVE_BUFFERS):
                lo, hi = e["data_offsets"]
                spans[key] = (f, 8 + n + lo, hi - lo, e["dtype"], tuple(e["shape"]))
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    handles = {f: open(f, "rb", buffering=0) for f in files}
    try:
        for key in sorted(spans):
            f, start, length, dtype, shape = spans[key]
            h.update(f"{key}|torch.{_TORCH_NAMES[dtype]}|{shape}\n".encode())
            while length:
                got = os.preadv(handles[f].fileno(), [memoryview(buf)[:min(length, CHUNK)]], start)
                if not got:
                    return {"fingerprint_of": files, "fingerprint": None}
                h.update(memoryview(buf)[:got])
                start, length = start + got, length - got
    finally:
        for fh in handles.values():
            fh.close()
    same = all(_stat_key(f) == st for f, st in stats.items())
    return {"fingerprint_of": files, "fingerprint": h.hexdigest() if same else None}


def main(argv: list[str]) -> int:
    """The child: hash each file, one JSON line each, flushed as it finishes; `--fingerprint F...`
    (last) also computes the fingerprint of the model whose weight files are F..."""
    files, fp = (argv[:argv.index("--fingerprint")], argv[argv.index("--fingerprint") + 1:]) \
        if "--fingerprint" in argv else (argv, [])
    for path in files:
        try:
            rec = _hash_one(path)
        except OSError:
            continue  # the parent hashes it itself
        print(json.dumps(rec), flush=True)
    if fp:
        try:
            print(json.dumps(_fingerprint(fp)), flush=True)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass  # the parent computes it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
