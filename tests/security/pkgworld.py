"""Valid inputs for the package / model / consent bad-input tables, built once per module, and the
small edits a forger makes to them (rewriting the sha256s, so only the deeper checks can catch it).

(A uniquely named module: `conftest`/`helpers` names clash across test folders.)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from flexmoe.convert.hf_export import export_hf
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.io.files import sha256_file
from helpers import make_public, make_trained_anchor

PKG_FILE, MANIFEST = "expert.safetensors", "manifest.json"
WEIGHTS, META, CONFIG = "model.safetensors", "flexmoe.json", "config.json"


def build_world(root: Path) -> dict[str, Path]:
    """A public model; packages `code` (research only) and `math` (commercial+research, expiring);
    their 3-expert merge (top-k routing, so export-hf takes it); and an HF 2-expert checkpoint made
    by export-hf from a merge of `code` alone (its flexmoe.json carries names and tensor_sha256)."""
    public = make_public(root)
    w = {"root": root, "public": public}
    terms = {"code": (["research"], None), "math": (["commercial", "research"], "2099-12-31")}
    for i, (d, (uses, expires)) in enumerate(terms.items()):
        trained = make_trained_anchor(root, public, d, seed=300 + i)
        w[f"pkg-{d}"] = make_package(trained, root / f"pkg-{d}", owner=f"owner-{d}", domain=d, licence="CC-BY-4.0",
                                     allowed_uses=uses, expires=expires)
    w["merged"] = merge(public, [w["pkg-code"], w["pkg-math"]], root / "merged", routing="topk")
    one = merge(public, [w["pkg-code"]], root / "merged-code", routing="topk")
    w["hf-code"] = export_hf(one, root / "hf-code")
    return w


def copy(src: Path, dst: Path) -> Path:
    """A copy of a directory to mutate (links kept as links)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Load `path`, let `fn` change the object in place (its return value is ignored), write it back."""
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=1))


def rehash_package(pkg: Path) -> None:
    """Rewrite the manifest's sha256 of the tensors file, as a forger would."""
    edit_json(pkg / MANIFEST, lambda m: m["files"].__setitem__(PKG_FILE, sha256_file(pkg / PKG_FILE)))


def edit_package_tensors(pkg: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the package's tensors and rewrite its sha256."""
    t = load_file(str(pkg / PKG_FILE))
    fn(t)
    save_file(t, str(pkg / PKG_FILE))
    rehash_package(pkg)


def rehash_model(model: Path, names: tuple[str, ...] = (WEIGHTS, CONFIG)) -> None:
    """Rewrite flexmoe.json's sha256s of `names`, as a forger would."""
    def fix(meta):
        for n in names:
            meta["files"][n] = sha256_file(model / n)
    edit_json(model / META, fix)


def edit_model_tensors(model: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change a native model's tensors and rewrite its file sha256 (not the per-expert hashes)."""
    sd = load_file(str(model / WEIGHTS))
    fn(sd)
    save_file(sd, str(model / WEIGHTS))
    rehash_model(model)


def edit_hf_tensors(hf: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors of a one-file HF checkpoint (HF directories carry no sha256s)."""
    sd = load_file(str(hf / WEIGHTS))
    fn(sd)
    save_file(sd, str(hf / WEIGHTS), metadata={"format": "pt"})


class _Canary:
    """Unpickling this creates the canary directory: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def write_pickle_bomb(path: Path, canary: Path) -> None:
    """A file that runs `mkdir canary` if anything ever unpickles it."""
    path.write_bytes(pickle.dumps(_Canary(str(canary))))
