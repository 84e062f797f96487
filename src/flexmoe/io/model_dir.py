"""Native model directories: `config.json` + weights + `flexmoe.json`, written atomically.

The weights are one `model.safetensors`, or shards with `model.safetensors.index.json` (io/shards.py,
Hugging Face's layout); every reader takes both, and flexmoe.json lists every file with its sha256.

Everything here is safetensors and JSON: nothing that crosses an organisation is a pickle. Every
read checks flexmoe.json against its schema (io/schema.py) and, unless the caller verified the
directory already, every listed file's sha256 and every expert slot's tensor_sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flexmoe.io.errors import CheckpointError  # defined there so io/schema and io/fingerprint can raise it
from flexmoe.io.files import atomic_output_dir, atomic_write_text, is_temp_dir, sha256_file  # noqa: F401  (re-exported)
from flexmoe.io.digests import verify as verify_digest
from flexmoe.io.fingerprint import parts_leaves, verify_expert_hashes
from flexmoe.io.prehash import stat_key
from flexmoe.io.schema import MODEL_META, RESERVED_NAMES, check
from flexmoe.io.shards import INDEX, is_weight_file, read_weights, weight_layout

from flexmoe.config.model import ModelConfig

CONFIG, WEIGHTS, META = "config.json", "model.safetensors", "flexmoe.json"


def atomic_dir(dst: str | Path, overwrite: bool = False, flag: str | None = None):
    """Yield a temp dir beside `dst`; rename it to `dst` only if the block finishes. `flag`: the
    command's option that allows replacing a non-empty `dst` (named in the refusal)."""
    return atomic_output_dir(dst, overwrite=overwrite, error=CheckpointError, flag=flag)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON via a temp file, fsync and rename (readers never see half)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def save_model_dir(dst: str | Path, cfg: ModelConfig, state_dict: dict[str, Any], meta: dict[str, Any],
                   extra_files: dict[str, Path] | None = None, overwrite: bool = False,
                   max_shard_size: int | str | None = None, progress=None) -> Path:
    """Write a native model directory atomically; `meta` lands in flexmoe.json with file sha256s.

    Tensors are written one at a time straight from memory (no serialised copy of the model), as
    one file or as shards of at most `max_shard_size` (bytes, or '5GB'); see io.native.write_native.
    An MoE's expert records (one per slot) get each slot's tensor_sha256 from `state_dict`: a model
    flexmoe writes always carries hashes that fit it (merge, router tuning)."""
    from flexmoe.io.native import write_native  # native reads directories with this module's checks
    from flexmoe.io.stream import FilePool

    experts = meta.get("experts") or []
    bind = cfg.is_moe and len(experts) == cfg.num_experts and (meta.get("kind") == "merged"
                                                              or any("tensor_sha256" in e for e in experts))
    with FilePool() as pool, atomic_dir(dst, overwrite=overwrite) as tmp:
        for name, src in (extra_files or {}).items():
            if Path(src).is_dir():
                shutil.copytree(src, tmp / name)
            else:
                shutil.copy2(src, tmp / name)
        write_native(tmp, cfg, state_dict, meta, pool, progress, max_shard_size=max_shard_size, bind_experts=bind)
    return Path(dst)


# Files of a Hugging Face tokenizer directory (the ones a model directory carries in `tokenizer/`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TOKENIZER_DIR = "tokenizer"


def carry_tokenizer(meta: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """`meta` for a model directory being written into `tmp`, with its HF tokenizer copied into
    `tmp/tokenizer/` and recorded there: every model a model is made from (branch, train, merge,
    remove-expert, import) then carries the tokenizer its data was made with, and export-hf ships it."""
    spec = meta.get("tokenizer")
    if isinstance(spec, str) and spec != "bytes" and Path(spec).is_dir():  # the run's `tokenizer=DIR` setting
        spec = {"type": "hf", "path": str(Path(spec).resolve())}
    if not (isinstance(spec, dict) and spec.get("type") == "hf" and isinstance(spec.get("path"), str)):
        return meta
    src = Path(spec["path"])
    if not src.is_absolute() or (tmp / TOKENIZER_DIR).resolve() == src.resolve():
        return meta  # already inside the directory being written (relative), or copied there
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        return meta  # nothing to carry: the record stays as it was (readers say what is missing)
    (tmp / TOKENIZER_DIR).mkdir(exist_ok=True)
    for n in names:
        shutil.copy2(src / n, tmp / TOKENIZER_DIR / n)
    return dict(meta, tokenizer=dict(spec, path=TOKENIZER_DIR))


def read_model_meta(src: str | Path) -> dict[str, Any]:
    """flexmoe.json of a native model directory, checked against its schema and the directory.

    A directory without one is refused: it is what lists the files' sha256s, so a model without it
    could be anything (a Hugging Face directory needs `flexmoe import-hf`)."""
    src = Path(src)
    if not (src / META).is_file() and (src / "trainer_state.json").is_file():
        raise CheckpointError(f"{src}: is a training checkpoint, not a model directory; turn it into one with "
                              f"`flexmoe checkpoint-to-model {src} OUT`")
    if not (src / META).is_file():
        raise CheckpointError(f"{src / META}: missing; a flexmoe model directory records its files' sha256s there "
                              "(made by train, branch, merge or import-hf; a Hugging Face directory needs "
                              "`flexmoe import-hf`)")
    meta = read_json(src / META)
    check(meta, MODEL_META, src / META)
    check_model_meta(src, meta)
    spec = meta.get("tokenizer")
    if isinstance(spec, dict) and spec.get("type") == "hf" and isinstance(spec.get("path"), str) \
            and not Path(spec["path"]).is_absolute():
        # relative to this directory: made absolute so that a model written from this one (branch,
        # train, merge, remove-expert) finds the files and carries them (carry_tokenizer)
        meta = dict(meta, tokenizer=dict(spec, path=str((src / spec["path"]).resolve())))
    return meta


def check_model_meta(src: Path, meta: dict[str, Any]) -> None:
    """What the schema cannot say: weights and config hashed, shipped files hashed, expert records sound."""
    files = meta["files"]
    for name in (INDEX if INDEX in files else WEIGHTS, CONFIG):
        if name not in files:
            raise CheckpointError(f"{src / META}: field 'files' does not list {name}, so nothing proves it unchanged")
    shipped = (meta.get("router_embedding") or {}).get("router_public")
    if shipped and shipped not in files:
        raise CheckpointError(f"{src / META}: field 'router_embedding.router_public' names {shipped!r}, "
                              "which 'files' does not hash")
    experts = meta.get("experts") or []
    for j, e in enumerate(experts):
        if e.get("slot", j) != j:
            raise CheckpointError(f"{src / META}: field 'experts[{j}].slot' is {e['slot']}, not its position {j}")
        if j > 0 and {e["owner"].lower(), e["domain"].lower()} & set(RESERVED_NAMES):
            raise CheckpointError(f"{src / META}: field 'experts[{j}]' is named 'public', which only slot 0 may be")
        # Every record of a merged model is bound to its slot's tensors; one without a hash could
        # carry any consent for any weights.
        if meta.get("kind") == "merged" and not e.get("tensor_sha256"):
            raise CheckpointError(f"{src / META}: field 'experts[{j}].tensor_sha256' is missing; every expert of a "
                                  "merged model carries one (merge again)")


def verify_files(src: Path, meta: dict[str, Any], defer=None) -> None:
    """Every file listed in flexmoe.json's `files` must be a plain file inside `src` with its recorded
    sha256 (or parts' sha256s: io.digests).

    `defer` (an io.stream.FilePool): the weight files are not hashed here but registered with it, to be
    hashed by the pass that reads them (`FilePool.check_expected` refuses a mismatch)."""
    root = Path(src).resolve()
    for name, digest in meta.get("files", {}).items():
        f = src / name
        if f.is_symlink() or not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{f}: a link or outside {src}; {src / META} may list only plain files inside it")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if defer is not None and is_weight_file(name) and name != INDEX:
            defer.expect(f, digest, src / META)
        else:
            verify_digest(f, digest, src / META)


def check_weight_listing(src: Path, meta: dict[str, Any]) -> list[str]:
    """The weight files on disk (io.shards.weight_layout) are the ones flexmoe.json lists; returns them."""
    names = weight_layout(src)
    files = meta.get("files", {})
    for name in names:
        if name not in files:
            raise CheckpointError(f"{src / META}: field 'files' does not list {name}, so nothing proves it unchanged")
    stale = sorted(n for n in files if is_weight_file(n) and n not in names)
    if stale:
        raise CheckpointError(f"{src / META}: field 'files' lists {stale[0]}, which is not part of the model's "
                              f"weights ({names[0]}); the listing is not this directory's")
    return names


def load_model_dir(src: str | Path, verify: bool = True) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Read a native model directory; flexmoe.json is always schema-checked, and with `verify` the
    file sha256s and every expert's tensor_sha256 must match it."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a flexmoe model directory)")
    if not (src / CONFIG).is_file() and (src / "manifest.json").is_file():
        raise CheckpointError(f"{src}: is an expert package, not a model; merge it with the public model first")
    refuse_temp_dir(src)
    meta = read_model_meta(src)
    weights = [n for n in meta.get("files", {}) if is_weight_file(n) and (src / n).is_file()]
    before = {n: stat_key(src / n) for n in weights}  # the bytes loaded must be the bytes verified
    if verify:
        verify_files(src, meta)
    names = check_weight_listing(src, meta)
    try:
        cfg = ModelConfig.load(src / CONFIG)
    except ValueError as e:
        raise CheckpointError(str(e).splitlines()[0]) from e
    if names != [WEIGHTS]:
        read_weights(src)  # the index against the shards' headers, both ways
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # torch tensors: the caller computes with them

    sd: dict[str, Any] = {}
    for name in names[1:] if names[0] == INDEX else names:
        try:
            sd.update(load_file(str(src / name)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{src / name}: cannot read safetensors ({e})") from e
    changed = next((n for n in weights if stat_key(src / n) != before[n]), None)
    if verify and changed:
        raise CheckpointError(f"{src / changed}: changed while it was being read; re-run once nothing writes to it")
    if verify and cfg.is_moe:
        try:
            # A slot whose bytes are one part of a file just verified by parts takes that part's digest.
            leaves = parts_leaves(meta["files"], read_weights(src))
            verify_expert_hashes(sd, meta, cfg.num_layers, src, leaves=leaves)
        except (IndexError, RuntimeError) as e:  # tensors of another shape than the config says
            raise CheckpointError(f"{src / WEIGHTS}: expert tensors do not fit {src / CONFIG} ({e})") from e
    return cfg, sd, meta


def refuse_temp_dir(src: Path) -> None:
    """A writer's temporary directory (left by a killed run) is never read as a model."""
    if is_temp_dir(src):
        raise CheckpointError(f"{src}: the temporary directory of an interrupted write, not a finished model; "
                              "delete it and run the command again")


def refuse_overlap(out: str | Path, inputs: list[str | Path], flag: str) -> None:
    """Refuse an output directory that is, holds or sits inside one of the inputs: writing it
    would replace or change what is being read."""
    o = Path(out).resolve()
    for i in map(Path, inputs):
        r = i.resolve()
        if o == r or o.is_relative_to(r) or r.is_relative_to(o):
            raise CheckpointError(f"{out}: {flag} overlaps the input {i}; choose a directory outside every input")
