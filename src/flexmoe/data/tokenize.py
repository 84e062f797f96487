"""Tokenizers the data layer understands: raw bytes, or a local Hugging Face `tokenizer.json`.

Both expose `encode`, `encode_batch`, `decode`, `vocab_size`, `eos_id`, `pad_id` and `spec()`;
`spec()` is what manifests record, and `load_tokenizer(spec)` turns it back into a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, Union

from flexmoe.data.errors import DataError
from flexmoe.io.files import atomic_write_json, atomic_write_text, sha256_file

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Names used by common tokenizer families, tried when the config files name none.
_EOS_GUESSES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
_PAD_GUESSES = (PAD_TOKEN, "<pad>", "[PAD]")


class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    vocab_size: int
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 is end-of-text, 257 is padding."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of `text` as token ids."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts (same result as calling `encode` on each)."""
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text, skipping special ids; broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in (int(x) for x in ids) if 0 <= i < 256).decode("utf-8", "replace")

    def spec(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"type": "bytes", "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _byte_symbols() -> dict[int, str]:
    """Byte -> the printable character byte-level tokenizers use for it (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def write_hf_byte_tokenizer(out_dir: str | Path, model_max_length: int) -> list[str]:
    """Save ByteTokenizer as a Hugging Face tokenizer `AutoTokenizer` loads, giving exactly its ids:
    byte b is id b (a byte-level BPE without merges), `<|endoftext|>` 256, `<|pad|>` 257; decoding
    gives the text back. Returns the files written. Needs the `tokenizers` package (a dependency
    of transformers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    tok = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    # no regex split and no prefix space: the text is one run of bytes, each its own token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|pad|>", special=True)])
    if (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")) != (ByteTokenizer.eos_id, ByteTokenizer.pad_id):
        raise AssertionError("the byte tokenizer's special ids moved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, "flexmoe_tokenizer": "bytes"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
                                                            indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable JSON ({e}); fix or delete the file") from e
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a local directory holding `tokenizer.json`.

    eos/pad come from `tokenizer_config.json` or `special_tokens_map.json` when present, else
    from well-known token names; pad falls back to eos, eos may be None if nothing matches.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _RustTokenizer

        path = Path(path)
        self.path = path.parent if path.name == "tokenizer.json" else path
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"{self.path}: no tokenizer.json there; pass a Hugging Face tokenizer directory or 'bytes'")
        try:
            self._tok = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on bad files
            raise DataError(f"{file}: not a valid tokenizer.json ({e}); re-save it with `tokenizers`") from e
        # Literal "<|endoftext|>" inside a document is text, not a control token: without this a
        # document could end itself early or inject padding.
        self._tok.encode_special_tokens = True
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id("eos_token", _EOS_GUESSES)
        self.pad_id = self._special_id("pad_token", _PAD_GUESSES)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self._sha256: str | None = None

    def _special_id(self, key: str, guesses: Sequence[str]) -> int | None:
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            name = _token_name(_read_json(self.path / config).get(key))
            if name is not None:
                token_id = self._tok.token_to_id(name)
                if token_id is None:
                    raise DataError(
                        f"{self.path / config}: {key} {name!r} is not in tokenizer.json; fix the name or the vocabulary"
                    )
                return token_id
        for name in guesses:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts at once (the Rust side parallelises this)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text, dropping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for `token_id` (None when out of range)."""
        return self._tok.id_to_token(int(token_id))

    @property
    def sha256(self) -> str:
        """sha256 of the tokenizer.json this was loaded from (identifies the vocabulary)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path / "tokenizer.json")
        return self._sha256

    def spec(self) -> dict[str, Any]:
        """JSON-able description for manifests; `load_tokenizer` accepts it back."""
        return {
            "type": "hf",
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and a minimal tokenizer_config.json to `out_dir`; return it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "tokenizer.json", self._tok.to_str(pretty=True))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        # Names, not ids: that is what transformers reads back.
        if self.eos_id is not None:
            config["eos_token"] = self._tok.id_to_token(self.eos_id)
        if self.pad_id is not None:
            config["pad_token"] = self._tok.id_to_token(self.pad_id)
        atomic_write_json(out_dir / "tokenizer_config.json", config)
        return out_dir

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


AnyTokenizer = Union[ByteTokenizer, HFTokenizer]


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on `texts` locally and save it to `out_dir`.

    The vocabulary holds `<|endoftext|>` (eos, id 0), `<|pad|>` (id 1), the 256 byte symbols,
    then merges. Its size is exactly `vocab_size` when the texts offer enough distinct merges,
    and smaller (never larger) when they run out.
    """
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(f"vocab_size={vocab_size} is below 258 (256 bytes + eos + pad); raise vocab_size")
    tok = _RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # Every byte is in the vocabulary from the start, so no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write_json(
        out_dir / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    return HFTokenizer(out_dir)


def load_tokenizer(spec: str | Path | dict[str, Any], base_dir: str | Path | None = None) -> AnyTokenizer:
    """Build a tokenizer from "bytes", a tokenizer directory, or a dict from `spec()`.

    A dict naming an HF tokenizer with a sha256 must match the file found at its path, so data
    is never decoded with a different vocabulary than it was encoded with.
    """
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "hf":
            if "path" not in spec:
                raise DataError(f"tokenizer spec {spec!r} has no 'path'; give the tokenizer directory")
            path = Path(spec["path"])
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path  # specs inside a model directory are relative to it
            tok = HFTokenizer(_existing_dir(path))
            want = spec.get("sha256")
            if want and want != tok.sha256:
                raise DataError(
                    f"{tok.path / 'tokenizer.json'}: sha256 {tok.sha256} differs from the recorded {want}; "
                    "point the tokenizer setting at the tokenizer the data was prepared with"
                )
            return tok
        raise DataError(f"tokenizer spec type {kind!r} is unknown; use 'bytes' or 'hf'")
    if isinstance(spec, str) and spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(_existing_dir(spec))


def _existing_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: tokenizer path does not exist; pass 'bytes' or a directory with tokenizer.json")
    return path
