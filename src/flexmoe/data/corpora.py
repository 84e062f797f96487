"""Built-in demo corpora made from text every Python install carries (no network), plus
discovery of the optional shared benchmark corpora.

Domains: `public` (pydoc topic prose), `code` (stdlib sources), `legal` (licence texts of
installed packages), `math` (generated arithmetic and word problems). Output is deterministic
for a given machine, seed and settings.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
import site
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flexmoe.data.errors import DataError
from flexmoe.io.files import atomic_write_json, atomic_write_text

DOMAINS = ("public", "code", "legal", "math")
MAX_DOC_BYTES = 8 * 1024
_LEGAL_TOPUP_BYTES = 200_000
_SKIP_CODE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


def chunk_lines(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Split `text` into pieces of at most `max_bytes` UTF-8 bytes on line boundaries
    (a single longer line stays whole)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > max_bytes:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        chunks.append("".join(current))
    return chunks


class _Collector:
    """Accumulates unique documents of one domain up to a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.docs = max_bytes, 0, []
        self._seen: set[str] = set()

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def add(self, text: str) -> bool:
        """Add `text` (chunked); returns False once the budget is spent."""
        for chunk in chunk_lines(text):
            if self.full:
                return False
            # Exact duplicates would land in both train and val; keep the first copy only.
            digest = hashlib.sha256(chunk.encode("utf-8")).hexdigest()
            if not chunk.strip() or digest in self._seen:
                continue
            self._seen.add(digest)
            self.docs.append(chunk)
            self.bytes += len(chunk.encode("utf-8"))
        return not self.full


def _public(max_bytes: int) -> tuple[list[str], dict[str, Any]]:
    from pydoc_data import topics

    col = _Collector(max_bytes)
    for key in sorted(topics.topics):
        if not col.add(topics.topics[key]):
            break
    origin = f"pydoc_data.topics.topics of Python {sys.version.split()[0]}"
    return col.docs, {"origin": origin, "topics": len(topics.topics)}


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order; pruning here keeps tests and vendored code out.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_CODE_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _code(max_bytes: int) -> tuple[list[str], dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    col = _Collector(max_bytes)
    used = []
    for path in _stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few test fixtures are deliberately not UTF-8
        used.append(str(path.relative_to(root)))
        if not col.add(text):
            break
    return col.docs, {"origin": f"Python standard library sources under {root}", "files": used}


def _licence_files() -> list[Path]:
    roots = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    roots |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = []
    for root in sorted(roots):
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        metas = sorted([*root_path.glob("*.dist-info"), *root_path.glob("*.egg-info")])
        for meta in metas:
            if not meta.is_dir():
                continue
            # rglob: PEP 639 wheels keep licences in a licenses/ subfolder of dist-info.
            found += sorted(p for p in meta.rglob("*") if p.is_file() and p.name.upper().startswith(_LICENCE_PREFIXES))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for candidate in (stdlib / "LICENSE.txt", stdlib.parent / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"):
        if candidate.is_file():
            found.append(candidate)
            break
    return found


def _builtin_license_text() -> str:
    printer = getattr(builtins, "license", None)
    try:
        printer._Printer__setup()  # the text is loaded lazily on first display
        return "\n".join(printer._Printer__lines)
    except Exception:
        return ""  # interpreters started with -S have no `license` builtin


def _legal(max_bytes: int) -> tuple[list[str], dict[str, Any]]:
    col = _Collector(max_bytes)
    used = []
    for path in _licence_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        before = len(col.docs)
        more = col.add(text)
        if len(col.docs) > before:
            used.append(str(path))
        if not more:
            break
    if col.bytes < _LEGAL_TOPUP_BYTES:
        text = _builtin_license_text()
        before = len(col.docs)
        col.add(text)
        if len(col.docs) > before:
            used.append("builtins.license")
    return col.docs, {"origin": "licence files of installed packages and of Python", "files": used}


_NAMES = ["Tom", "Ana", "Raj", "Mei", "Sam", "Lena", "Omar", "Ivy", "Kofi", "Zoe", "Luis", "Noor"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "coins", "eggs"]


def _problem(rng: random.Random) -> str:
    kind = rng.randrange(9)
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    if kind < 3:
        op = "+-*"[kind]
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 30), rng.randint(2, 30))
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"Q: {a} {op} {b} = ?\nA: {value}\n"
    a, b, c = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 12)
    if kind == 3:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
        s = f"{a} + {b} = {a + b}. The answer is {a + b}."
    elif kind == 4:
        a += b
        q = f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?"
        s = f"{a} - {b} = {a - b}. The answer is {a - b}."
    elif kind == 5:
        q = f"There are {b} boxes with {c} {item} in each box. How many {item} are there in total?"
        s = f"{b} * {c} = {b * c}. The answer is {b * c}."
    elif kind == 6:
        q = f"{name} shares {b * c} {item} equally among {b} friends. How many {item} does each friend get?"
        s = f"{b * c} / {b} = {c}. The answer is {c}."
    elif kind == 7:
        q = f"{name} has {a} {item}. {name} buys {b} packs of {c} {item} each. How many {item} does {name} have now?"
        s = f"{b} * {c} = {b * c}. {a} + {b * c} = {a + b * c}. The answer is {a + b * c}."
    else:
        a += b + c
        q = f"A shop has {a} {item}. It sells {b} in the morning and {c} in the afternoon. How many {item} are left?"
        s = f"{a} - {b} = {a - b}. {a - b} - {c} = {a - b - c}. The answer is {a - b - c}."
    return f"Q: {q}\nA: {s}\n"


def _math(max_bytes: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    rng = random.Random(seed)
    col = _Collector(max_bytes)
    while col.add("\n".join(_problem(rng) for _ in range(rng.randint(3, 6)))):
        pass
    return col.docs, {"origin": f"generated arithmetic and word problems (random.Random({seed}))"}


def _split(docs: list[str], val_fraction: float, seed: int, domain: str) -> tuple[list[str], list[str]]:
    n = len(docs)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 and val_fraction > 0 else 0
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    val_idx = set(rng.choice(n, size=n_val, replace=False).tolist()) if n_val else set()
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _jsonl(docs: Iterable[str]) -> str:
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)


def build_builtin_corpora(
    out_dir: str | Path,
    *,
    max_bytes_per_domain: int = 1_500_000,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, list[Path]]]:
    """Write `out_dir/<domain>/{train,val}.jsonl` for the four built-in domains.

    Documents over 8 KB are split on line boundaries; duplicates are dropped; val is a seeded
    random `val_fraction` of each domain's documents (at least one). `out_dir/SOURCES.json`
    records where each domain's text came from. Returns {domain: {"train": [..], "val": [..]}}.
    """
    if max_bytes_per_domain < 1:
        raise DataError(f"max_bytes_per_domain={max_bytes_per_domain} must be >= 1; give a positive byte budget")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.05")
    out_dir = Path(out_dir)
    builders = {
        "public": lambda: _public(max_bytes_per_domain),
        "code": lambda: _code(max_bytes_per_domain),
        "legal": lambda: _legal(max_bytes_per_domain),
        "math": lambda: _math(max_bytes_per_domain, seed),
    }
    result: dict[str, dict[str, list[Path]]] = {}
    sources: dict[str, Any] = {}
    for domain in DOMAINS:
        docs, info = builders[domain]()
        if not docs:
            raise DataError(f"built-in domain {domain!r} found no text on this machine ({info['origin']}); drop the domain")
        train, val = _split(docs, val_fraction, seed, domain)
        paths = {"train": out_dir / domain / "train.jsonl", "val": out_dir / domain / "val.jsonl"}
        atomic_write_text(paths["train"], _jsonl(train))
        atomic_write_text(paths["val"], _jsonl(val))
        result[domain] = {split: [path] for split, path in paths.items()}
        sources[domain] = {
            **info,
            "documents": len(docs),
            "train_documents": len(train),
            "val_documents": len(val),
            "bytes": sum(len(d.encode("utf-8")) for d in docs),
        }
    atomic_write_json(out_dir / "SOURCES.json", {"seed": seed, "val_fraction": val_fraction, "domains": sources})
    return result


SHARED_FILES = {"math": "gsm8k_train.jsonl", "news": "agnews_7600.csv", "creative": "tinyshakespeare.txt"}


def default_shared_root() -> Path:
    """`../shared/corpora` beside the repository checkout this package was imported from."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "corpora"


def load_shared_corpora(root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the optional shared benchmark corpora under `root` (default
    `default_shared_root()`): {"math", "news", "creative"}, only those present. A missing root
    gives {} so callers can skip. Nothing is read or copied."""
    root = default_shared_root() if root is None else Path(root)
    if not root.is_dir():
        return {}
    return {name: root / file for name, file in SHARED_FILES.items() if (root / file).is_file()}
