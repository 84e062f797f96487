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
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from flexmoe.io.digests import Reader, hash_file, is_parts, part_lengths
from flexmoe.io.dtypes import FLOATING, ITEMSIZE, NAMES, TORCH_TEXT, nonfinite
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


def stat_key(path: str | Path) -> list[int]:
    """(size, mtime_ns, inode, device): a file rewritten since has another one."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]



def _hash_one(path: str, lengths: list[int] | None = None, finite: bool = False) -> dict:
    """The file's sha256 (or with `lengths` its parts' sha256s: io.digests) and its stat key; with
    `finite`, also `nonfinite`: the first tensor holding NaN or Inf ("" when none does), from the
    same read (absent when the file is not a safetensors file this reader can check)."""
    before = stat_key(path)
    try:
        check = _Finite(path) if finite else None
    except (OSError, ValueError, KeyError, TypeError, struct.error, ImportError):
        check = None  # the parent checks the values itself
    got = hash_file(path, lengths, visit=check, mapped=True)
    rec = {"path": path, "sha256": got, "stat": before if stat_key(path) == before else None}
    if check is not None:
        rec["nonfinite"] = check.bad or ""
    return rec


class _Finite:
    """Fed a safetensors file's bytes in order (hash_file's `visit`), finds the first floating-point
    tensor holding NaN or Inf; `bad` is its name."""

    def __init__(self, path: str):
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.regions = sorted((8 + n + int(e["data_offsets"][0]), 8 + n + int(e["data_offsets"][1]), e["dtype"], name)
                              for name, e in header.items() if e["dtype"] in FLOATING)
        self.bad, self._i, self._carry = None, 0, b""

    def __call__(self, offset: int, view) -> None:
        end = offset + len(view)
        while self._i < len(self.regions) and self.bad is None:
            lo, hi, dtype, name = self.regions[self._i]
            if lo >= end:
                return
            if hi > offset:
                data = bytes(self._carry) + bytes(view[max(lo, offset) - offset:min(hi, end) - offset]) \
                    if self._carry else view[max(lo, offset) - offset:min(hi, end) - offset]
                size = ITEMSIZE[dtype]
                whole = len(data) // size * size  # an element split between two reads waits for the rest
                if nonfinite(data[:whole], dtype):
                    self.bad = name
                self._carry = bytes(data[whole:])
            if hi > end:
                return
            self._i, self._carry = self._i + 1, b""


class Prehash:
    """Digests of `paths`, computed by up to `workers` child processes (balanced by file size), or
    here and now when they total at most INLINE_BYTES (a child's start-up, ~0.15 s, would cost
    more than hashing them; measured: a tiny merge took 0.17 s with a child, 0.02 s without)."""

    def __init__(self, paths: list[Path], workers: int | None = None, fingerprint: list[Path] = (),
                 parts: dict[Path, list[int]] | None = None, finite: list[Path] = ()):
        fingerprint = [Path(p).resolve() for p in fingerprint]
        size = {p: p.stat().st_size for p in {Path(p).resolve() for p in [*paths, *fingerprint]}}
        files = sorted(size, key=lambda p: -size[p])
        # Files whose listing records parts (io.digests) are hashed part by part.
        self._parts = {str(Path(p).resolve()): list(n) for p, n in (parts or {}).items()}
        self._finite = {str(Path(p).resolve()) for p in finite}  # also checked for NaN / Inf (expert weights)
        self._owner: dict[Path, subprocess.Popen | None] = {}
        self._done: dict[Path | str, dict] = {}
        self._procs: list[subprocess.Popen] = []
        self._fp_files, self._fp_proc = [str(p) for p in fingerprint], None
        if sum(size.values()) <= INLINE_BYTES:
            self._inline(files)
            return
        # When every input records parts, the command's own pass copies in the kernel and hashes
        # nothing: one child per usable CPU, the parent's included (it imports torch, then waits;
        # measured on 2 cores: a merge took 6.6 s with 2 children, 7.2-8.2 s with 1). Otherwise
        # that pass hashes what it copies and one core stays with the parent (9.9-10.6 s with 2
        # children, 8.3-9.1 with 1). At most MAX_WORKERS (each holds a chunk and an interpreter,
        # ~30 MB), about what memory bandwidth feeds anyway. The fingerprint reads its files
        # again: it is one more job, weighed by those files' size.
        jobs: list = files + (["fingerprint"] if fingerprint else [])
        weight = {**size, "fingerprint": sum(size[p] for p in fingerprint)}
        jobs.sort(key=lambda j: -weight[j])
        spare = 0 if all(str(f) in self._parts for f in files) else 1
        workers = max(1, min(workers or min(MAX_WORKERS, usable_cpus() - spare), len(jobs)))
        groups: list[list] = [[] for _ in range(workers)]
        loads = [0] * workers
        for job in jobs:  # largest first onto the least-loaded child
            i = loads.index(min(loads))
            groups[i].append(job)
            loads[i] += weight[job]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for group in filter(None, groups):
            paths = [j for j in group if j != "fingerprint"]
            extra = ["--fingerprint", *self._fp_files] if "fingerprint" in group else []
            proc = subprocess.Popen([sys.executable, "-m", "flexmoe.io.prehash", *map(str, paths), *extra],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    env=env)
            try:  # which files record parts (their lengths) and which to check for NaN / Inf, as JSON
                proc.stdin.write(json.dumps({"parts": {f: self._parts[f] for f in map(str, paths) if f in self._parts},
                                             "finite": [f for f in map(str, paths) if f in self._finite]}))
                proc.stdin.close()
            except OSError:
                pass  # a child that died: the parent hashes its files itself
            self._procs.append(proc)
            self._owner.update({f: proc for f in paths})
            self._fp_proc = proc if extra else self._fp_proc

    def _inline(self, files: list[Path]) -> None:
        for f in files:
            self._owner[f] = None
            try:
                self._done[f] = _hash_one(str(f), self._parts.get(str(f)), str(f) in self._finite)
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

    def digest(self, path: Path) -> str | list | None:
        """The file's sha256 (its parts' sha256s when its listing records parts) as a child read it;
        None if no child did (the caller hashes it itself). Refuses a file whose size, mtime, inode
        or device changed since. Waits for the child."""
        path = Path(path).resolve()
        self._read_until(self._owner.get(path), lambda: path in self._done)
        rec = self._done.get(path)
        if rec is None:
            return None
        try:
            unchanged = rec["stat"] is not None and rec["stat"] == stat_key(path)
        except OSError:
            unchanged = False
        if not unchanged:
            raise CheckpointError(f"{path}: changed while it was being read; re-run once nothing writes to it")
        return rec["sha256"]

    def nonfinite(self, path: Path) -> str | None:
        """The first tensor of `path` holding NaN or Inf as the child that hashed it found ("" when none
        does); None when no child checked (the caller checks the values itself). Refuses a changed file."""
        if self.digest(path) is None:
            return None
        return self._done[Path(path).resolve()].get("nonfinite")

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


def start(paths: list[Path], fingerprint: list[Path] = (), parts: dict[Path, list[int]] | None = None,
          finite: list[Path] = ()) -> Prehash | None:
    """Begin hashing `paths` (those that are plain files) in child processes, those in `parts` part by
    part (io.digests), and the fingerprint of the dense model whose weight files are `fingerprint`;
    the result is the one `active()` returns until `stop()`. None (and nothing started) when there is
    nothing to hash."""
    global _ACTIVE
    stop()
    files, fp = _plain(paths), _plain(fingerprint)
    if not files and not fp:
        return None
    _ACTIVE = Prehash(files, fingerprint=fp if len(fp) == len(fingerprint) else [], parts=parts, finite=finite)
    return _ACTIVE


def active() -> Prehash | None:
    """The running prehash (io.stream.FilePool consults it when told to expect a digest)."""
    return _ACTIVE


def finite_checked(paths) -> frozenset:
    """Those of `paths` whose values a child process checked and found finite; a NaN or Inf it found is
    refused here (the caller's writer then needs no bytes of them for that check)."""
    pre, done = active(), set()
    for path in paths:
        bad = pre.nonfinite(path) if pre is not None and pre.covers(path) else None
        if bad:
            raise CheckpointError(f"{path}: {bad} holds NaN or Inf values; the expert is broken, do not merge it")
        if bad == "":
            done.add(path)
    return frozenset(done)


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
    return list(listed_records(directory, listing, model=model))


def listed_records(directory: str | Path, listing: str, *, model: bool = False) -> dict[Path, object]:
    """`listed_weight_files` with each file's entry (a sha256, or parts: io.digests)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / listing).read_text()).get("files") or {}
        return {directory / name: rec for name, rec in files.items() if isinstance(name, str)
                and name.endswith(".safetensors") and "/" not in name and name not in ("", ".", "..")
                and (not model or WEIGHTS.fullmatch(name))}
    except (OSError, ValueError, AttributeError):
        return {}


def parts_of(records: dict[Path, object]) -> dict[Path, list[int]]:
    """The parts' lengths of the entries that record parts (malformed ones are left to the reader)."""
    out = {}
    for path, rec in records.items():
        try:
            lengths = part_lengths(rec) if is_parts(rec) else None
        except (KeyError, TypeError, ValueError):
            lengths = None
        if lengths is not None:
            out[path] = lengths
    return out



def _fingerprint(files: list[str]) -> dict:
    """io.fingerprint.fingerprint of the dense model whose weights are `files`, read without torch;
    None when the files hold what this reader does not handle (the parent computes it then)."""
    from flexmoe.config.model import NATIVE_BUFFERS
    from flexmoe.io.keys import is_router_key, parse_experts_key

    stats = {f: stat_key(f) for f in files}
    spans = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for key, e in header.items():
            if parse_experts_key(key) or e["dtype"] not in NAMES:
                return {"fingerprint_of": files, "fingerprint": None}  # an MoE: not a public model
            if not (is_router_key(key) or key in NATIVE_BUFFERS):
                lo, hi = e["data_offsets"]
                spans[key] = (f, 8 + n + lo, hi - lo, e["dtype"], tuple(e["shape"]))
    h = hashlib.sha256()
    # Mapped, as hash_file(mapped=True) reads: no copy out of the page cache (a truncation kills
    # this child with SIGBUS; the parent then computes the fingerprint itself).
    with contextlib.ExitStack() as stack:
        readers = {f: stack.enter_context(Reader(stack.enter_context(open(f, "rb", buffering=0)), True))
                   for f in files}
        for key in sorted(spans):
            f, start, length, dtype, shape = spans[key]
            h.update(f"{key}|{TORCH_TEXT[dtype]}|{shape}\n".encode())
            readers[f].seek(start)
            while length:
                piece = readers[f].read(min(length, CHUNK))
                if not len(piece):
                    return {"fingerprint_of": files, "fingerprint": None}
                h.update(piece)
                length -= len(piece)
    same = all(stat_key(f) == st for f, st in stats.items())
    return {"fingerprint_of": files, "fingerprint": h.hexdigest() if same else None}


def main(argv: list[str]) -> int:
    """The child: hash each file, one JSON line each, flushed as it finishes (part by part where the
    JSON object on stdin gives a file's parts' lengths, and checked for NaN / Inf where it lists the
    file under "finite"); `--fingerprint F...` (last on the command line, computed first) also gives
    the fingerprint of the model whose weight files are F..."""
    files, fp = (argv[:argv.index("--fingerprint")], argv[argv.index("--fingerprint") + 1:]) \
        if "--fingerprint" in argv else (argv, [])
    try:
        spec = json.loads(sys.stdin.read() or "{}")
    except (OSError, ValueError):
        spec = {}
    parts, finite = spec.get("parts") or {}, set(spec.get("finite") or ())
    if fp:  # first: the parent waits for it before it checks the packages against it
        try:
            print(json.dumps(_fingerprint(fp)), flush=True)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass  # the parent computes it
    for path in files:
        try:
            rec = _hash_one(path, parts.get(path), path in finite)
        except OSError:
            continue  # the parent hashes it itself
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
