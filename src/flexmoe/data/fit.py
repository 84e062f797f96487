"""Does prepared data fit a model? Same tokenizer, and every token id inside its vocabulary.

A model trained or evaluated on data of another tokenizer reads garbage (or, with ids past its
vocabulary, fails deep inside the embedding). The data manifest records the tokenizer's `spec()`;
a model's flexmoe.json records `tokenizer` as `bytes`, a tokenizer directory, or such a spec.
Both are reduced to an identity (bytes, or the sha256 of tokenizer.json) and compared, and each
shard's largest id is checked once (cached per file version) against the model's vocab_size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexmoe.data.errors import DataError
from flexmoe.data.manifest import MANIFEST_NAME, max_token_id
from flexmoe.io.files import sha256_file


def tokenizer_identity(spec: Any, base_dir: str | Path | None = None) -> tuple[str, ...] | None:
    """("bytes",) or ("hf", sha256 of tokenizer.json); None when the spec says too little to tell."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "bytes":
            return ("bytes",)
        spec = {"type": "hf", "path": spec}
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "bytes":
        return ("bytes",)
    if spec.get("type") != "hf":
        return None
    if isinstance(spec.get("sha256"), str) and spec["sha256"]:
        return ("hf", spec["sha256"])
    if not isinstance(spec.get("path"), str):
        return None
    path = Path(spec["path"]).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    file = path if path.name == "tokenizer.json" else path / "tokenizer.json"
    try:
        return ("hf", sha256_file(file)) if file.is_file() else None
    except OSError:
        return None


def _describe(ident: tuple[str, ...]) -> str:
    return "byte tokens" if ident[0] == "bytes" else f"the tokenizer with sha256 {ident[1][:12]}..."


def _token_arrays(windows) -> list[tuple[Path, Any]]:
    """(file, token array) of a TokenWindows or SFTWindows."""
    if hasattr(windows, "shard_arrays"):
        return windows.shard_arrays()
    return [(Path(windows.data_dir) / "tokens.npy", windows.tokens)]


def check_data_fits_model(windows, vocab_size: int, model_tokenizer: Any, *, setting: str, model: str,
                          model_dir: str | Path | None = None) -> None:
    """Refuse data (a TokenWindows or SFTWindows) that does not fit a model, naming `setting`.

    `model_tokenizer`: what the model records (flexmoe.json's `tokenizer`, or the run's
    `tokenizer` setting); None skips the identity check, never the vocabulary one."""
    manifest_path = Path(windows.data_dir) / MANIFEST_NAME
    spec = windows.manifest["tokenizer"]
    mine, theirs = tokenizer_identity(spec), tokenizer_identity(model_tokenizer, model_dir)
    if mine is not None and theirs is not None and mine != theirs:
        raise DataError(f"{setting}={windows.data_dir}: prepared with {_describe(mine)}, but {model} uses "
                        f"{_describe(theirs)}; prepare the data with the model's tokenizer "
                        "(flexmoe prepare-data --tokenizer ...)")
    data_vocab = spec.get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > vocab_size:
        raise DataError(f"{setting}={windows.data_dir}: its tokenizer has {data_vocab} ids ({manifest_path}) but "
                        f"{model} has vocab_size {vocab_size}; prepare the data with the model's tokenizer")
    for path, tokens in _token_arrays(windows):
        top = max_token_id(path, tokens)
        if top >= vocab_size:
            raise DataError(f"{setting}={windows.data_dir}: {path} holds token id {top}, outside {model}'s "
                            f"vocab_size {vocab_size}; prepare the data with the model's tokenizer")
