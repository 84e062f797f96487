#!/usr/bin/env python3
"""Release checklist: what to confirm before a merged model or its Hugging Face export leaves.

    python tools/release_checklist.py MERGED_OR_HF_DIR [--use research]

Native model directory (flexmoe merge / remove-expert output): every file's sha256 and every
expert's tensor_sha256 verify, every owner expert carries a consent record (covering `--use` when
given), the tokenizer is there. Hugging Face directory (flexmoe export-hf output): config and
weights agree, the tokenizer loads, a model card lists every expert. Prints one line per check;
exit code 0 when all pass, 1 when any fails, 2 when the path is not a model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


def _native_checks(path: Path, use: str | None) -> list[tuple[str, Callable[[], str | None]]]:
    from flexmoe.io.model_dir import load_model_dir, read_model_meta

    meta = read_model_meta(path)
    experts = meta.get("experts") or []

    def hashes() -> str | None:
        load_model_dir(path, verify=True)  # raises naming the file or expert that does not verify
        return None

    def consent() -> str | None:
        missing = [f"{e.get('owner')}/{e.get('domain')}" for e in experts[1:] if not e.get("consent")]
        return f"no consent record: {', '.join(missing)}" if missing else None

    def covers() -> str | None:
        from flexmoe.flex.consent import consent_mask

        mask = consent_mask(experts, use)
        off = [f"{e.get('owner')}/{e.get('domain')}" for j, e in enumerate(experts) if j and not bool(mask[j])]
        return f"consent does not cover {use}: {', '.join(off)} (export-hf --use {use} removes them)" if off else None

    def tokenizer() -> str | None:
        spec = meta.get("tokenizer")
        if spec is None:
            return "no tokenizer recorded"
        if isinstance(spec, dict) and spec.get("type") == "hf" and not (Path(spec["path"]) / "tokenizer.json").is_file():
            return f"tokenizer files missing at {spec['path']}"
        return None

    checks = [("files and expert tensors verify", hashes), ("tokenizer present", tokenizer)]
    if experts:
        checks.append(("every owner expert records consent", consent))
        if use:
            checks.append((f"every owner expert consents to {use}", covers))
    return checks


def _hf_checks(path: Path, use: str | None) -> list[tuple[str, Callable[[], str | None]]]:
    config = json.loads((path / "config.json").read_text())
    meta = json.loads((path / "flexmoe.json").read_text()) if (path / "flexmoe.json").is_file() else {}

    def weights() -> str | None:
        from flexmoe.io.hf_dir import open_hf_dir

        open_hf_dir(path)  # reads every header and checks the shapes against config.json
        return None

    def tokenizer() -> str | None:
        if not (path / "tokenizer.json").is_file():
            return "no tokenizer.json: AutoTokenizer cannot load this release"
        try:
            from transformers import AutoTokenizer
        except ImportError:
            return None
        AutoTokenizer.from_pretrained(str(path))
        return None

    def card() -> str | None:
        card_file = path / "README.md"
        if not card_file.is_file():
            return "no model card (README.md)"
        text = card_file.read_text()
        if not text.startswith("---\n"):
            return "README.md has no Hugging Face front matter"
        missing = [e.get("owner") for e in meta.get("experts") or [] if e.get("owner") and e["owner"] not in text]
        return f"model card does not list {', '.join(missing)}" if missing else None

    def experts() -> str | None:
        n = config.get("num_experts")
        listed = meta.get("experts")
        if n and listed is not None and len(listed) != n:
            return f"flexmoe.json lists {len(listed)} experts, config.json has num_experts={n}"
        return None

    def for_use() -> str | None:
        if not use or not text_of(path / "README.md"):
            return None
        return None if f"**{use}**" in text_of(path / "README.md") else f"not exported for {use} (export-hf --use {use})"

    return [("weights fit config.json", weights), ("tokenizer loads", tokenizer), ("model card lists every expert", card),
            ("expert records match the config", experts), *([(f"exported for use {use}", for_use)] if use else [])]


def text_of(p: Path) -> str:
    return p.read_text() if p.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/release_checklist.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a native merged model directory or a Hugging Face export")
    p.add_argument("--use", help="the use the release is for (research, commercial, ...)")
    a = p.parse_args(argv)
    path = Path(a.path)
    if (path / "flexmoe.json").is_file() and (path / "config.json").is_file() and not (path / "generation_config.json").is_file():
        kind, checks = "native", _native_checks
    elif (path / "config.json").is_file():
        kind, checks = "hf", _hf_checks
    else:
        print(f"release_checklist: error: {path}: no config.json; pass a model directory or an HF export", file=sys.stderr)
        return 2
    failed = 0
    print(f"release checklist for {path} ({kind})")
    for name, check in checks(path, a.use):
        try:
            problem = check()
        except Exception as e:  # noqa: BLE001  (each failure is reported as its check's line)
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        failed += problem is not None
        print(f"  [{'FAIL' if problem else 'ok'}] {name}" + (f": {problem}" if problem else ""))
    print("all checks pass" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
