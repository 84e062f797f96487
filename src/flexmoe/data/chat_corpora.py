"""Built-in chat data for the BAR quickstart, from text every machine has: arithmetic questions
with worked answers (`math`), and docstring -> function pairs from the standard library (`code`)."""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path
from flexmoe.io.files import atomic_write_text


def arithmetic_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` seeded arithmetic questions (sums, products, word problems) with worked, correct answers."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        q, ans = rng.choice([
            (f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."),
            (f"What is {a} * {c}?", f"{a} * {c} = {a * c}. The answer is {a * c}."),
            (f"Sam has {a} marbles and wins {b} more. How many marbles does Sam have?",
             f"{a} + {b} = {a + b}. Sam has {a + b} marbles."),
            (f"A box holds {c} rows of {a} pens. How many pens?", f"{c} * {a} = {c * a}. There are {c * a} pens."),
        ])
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": ans}])
    return chats


def docstring_chats(max_chats: int, max_chars: int = 1500) -> list[list[dict[str, str]]]:
    """'Write a function that <docstring>' -> the function's source, from stdlib modules."""
    chats = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            body = ast.get_source_segment(src, node)
            if not doc or not body or len(body) > max_chars:
                continue
            prompt = f"Write a Python function `{node.name}`: {doc.strip().splitlines()[0]}"
            chats.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": body}])
            if len(chats) >= max_chats:
                return chats
    return chats


def build_chat_corpora(out_dir: str | Path, *, n_math: int = 3000, n_code: int = 1500, val_fraction: float = 0.05,
                       seed: int = 0) -> dict[str, dict[str, Path]]:
    """`{domain: {"train": jsonl, "val": jsonl}}` of `{"messages": [...]}` lines."""
    out = Path(out_dir)
    result = {}
    for domain, chats in (("math", arithmetic_chats(n_math, seed)), ("code", docstring_chats(n_code))):
        rng = random.Random(seed)
        rng.shuffle(chats)
        n_val = max(1, int(len(chats) * val_fraction))
        for split, part in (("val", chats[:n_val]), ("train", chats[n_val:])):
            p = out / domain / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p, "".join(json.dumps({"messages": c}) + "\n" for c in part))
            result.setdefault(domain, {})[split] = p
    return result
