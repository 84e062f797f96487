"""The package's structure: layers import downwards only, model/ does no file I/O, files stay short,
and parameter names are typed out only in the key schema (flexmoe/io/keys.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "flexmoe"

# Bottom to top. A package may import itself and anything of a lower rank; equal ranks are peers
# that must not import each other.
RANKS = {
    "config": 0, "io": 1, "data": 2, "model": 3, "parallel": 4, "train": 5, "flex": 6,
    "convert": 7, "eval": 7, "recipes": 8, "commands": 9, "cli": 10, "__init__": 10,
}
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `flexmoe.X...` import of a file, lazy ones (inside functions) included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "flexmoe" or n.startswith("flexmoe.")]
    return out


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def test_every_package_has_a_rank():
    layers = {_layer(p) for p in _modules()}
    assert layers <= set(RANKS), f"new top-level packages need a rank in RANKS: {sorted(layers - set(RANKS))}"


def test_layers_import_downwards_only():
    bad = []
    for path in _modules():
        me = _layer(path)
        for line, name in _imports(path):
            other = name.split(".")[1] if "." in name else "__init__"
            if other == me:
                continue
            if RANKS[other] >= RANKS[me]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {name} ({other})")
    assert not bad, "imports that run sideways or upwards:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for path in _modules():
        for _, name in _imports(path):
            other = name.split(".")[1] if "." in name else "__init__"
            if other != _layer(path):
                edges.setdefault(_layer(path), set()).add(other)

    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for b in edges.get(todo.pop(), ()):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    cycles = sorted(a for a in edges if a in reach(a))
    assert not cycles, f"packages on an import cycle: {cycles}"


@pytest.mark.parametrize("path", sorted((ROOT / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_does_no_file_io(path):
    text = path.read_text()
    tree = ast.parse(text)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pathlib", "os", "shutil", "safetensors", "json", "tempfile", "numpy"}, imported
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls


def test_no_module_above_max_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# A native or HF parameter name typed out in a string: "layers.{i}...", "layers.*.ffn...",
# "model.layers...", "...ffn.experts...", "...ffn.router...".
_TEMPLATE = re.compile(r"^(model\.)?layers\.|\bffn\.(experts|router)\b")


def _string_pieces(tree: ast.AST):
    """(line, text) of every string constant and f-string piece, docstrings left out."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            yield n.lineno, n.value


def test_parameter_names_only_in_the_key_schema():
    found = []
    for path in _modules():
        if path.relative_to(ROOT).as_posix() == "io/keys.py":
            continue
        for line, text in _string_pieces(ast.parse(path.read_text())):
            if _TEMPLATE.search(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "parameter-name templates outside flexmoe/io/keys.py:\n" + "\n".join(found)


# Temp-file-then-rename is written once (io/files.py: temp beside the target, fsync, rename,
# umask-honouring modes); DCP's checkpoint directory rename in train/checkpoint.py is the one other.
_RENAME_OWNERS = {"io/files.py", "train/checkpoint.py"}


def test_atomic_writes_only_through_io_files():
    found = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel in _RENAME_OWNERS:
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("mkstemp", "mkdtemp") \
                    or isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "replace" \
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "os":
                found.append(f"{rel}:{n.lineno}")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "replace" \
                    and len(n.args) == 1 and not n.keywords:  # Path.replace(target): a hand-made rename
                found.append(f"{rel}:{n.lineno}")
    assert not found, "temp-and-rename written by hand (use flexmoe.io.files):\n" + "\n".join(found)
