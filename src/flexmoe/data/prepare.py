"""`prepare_data`: tokenize text files into `.npy` token shards plus a checked manifest."""

from __future__ import annotations

import shutil
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexmoe.data.documents import expand_inputs, iter_documents, iter_user_documents
from flexmoe.data.errors import DataError
from flexmoe.io.files import (atomic_write_json, make_temp_dir, check_disjoint, check_output_dir, clean_stale_temps, replace_dir,
                              sha256_file)
from flexmoe.data.manifest import FORMAT, MANIFEST_NAME, USER_IDS_NAME, load_manifest
from flexmoe.data.tokenize import load_tokenizer

__all__ = ["prepare_data", "load_manifest", "choose_dtype"]

# Documents are tokenized in groups so fast tokenizers can batch (and parallelise) the work.
_BATCH_DOCS = 256
_BATCH_CHARS = 1 << 20


def choose_dtype(dtype: str, vocab_size: int) -> np.dtype:
    """The shard dtype: "auto" gives uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    if dtype == "uint16":
        if vocab_size > 65535:
            raise DataError(f"dtype=uint16 cannot hold a vocabulary of {vocab_size}; use dtype=uint32 or auto")
        return np.dtype(np.uint16)
    if dtype == "uint32":
        return np.dtype(np.uint32)
    raise DataError(f"dtype={dtype!r} is not one of auto, uint16, uint32; pick one of those")


class _ShardWriter:
    """Cuts a token stream into shards of exactly `shard_tokens` tokens (the last may be short)."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.num_pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.num_pending += len(tokens)
        if self.num_pending >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            full = len(stream) - len(stream) % self.shard_tokens
            for start in range(0, full, self.shard_tokens):
                self._write(stream[start : start + self.shard_tokens])
            rest = stream[full:]
            self.pending, self.num_pending = ([rest] if len(rest) else []), len(rest)

    def close(self) -> list[dict[str, Any]]:
        if self.num_pending:
            self._write(np.concatenate(self.pending))
        self.pending, self.num_pending = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"shard-{len(self.shards):05d}.npy"
        path = self.out_dir / name
        np.save(path, np.ascontiguousarray(tokens))
        self.shards.append({"path": name, "num_tokens": int(len(tokens)), "sha256": sha256_file(path)})


class _UserIds:
    """Dense user ids, 0..U-1 in order of first appearance, one per document written.

    Only the dense ids are kept (in the prepared directory): the raw values of the user field
    (names, e-mail addresses) are not written anywhere."""

    def __init__(self, field: str):
        self.field = field
        self.index: dict[str, int] = {}
        self.ids = array("q")

    def take(self, pairs: Iterable[tuple[str, str]]) -> Iterator[str]:
        """The documents of (document, user key) pairs, recording each one's user as it passes:
        lazily, so the ids follow exactly the documents the tokenizer receives."""
        for text, key in pairs:
            self.ids.append(self.index.setdefault(key, len(self.index)))
            yield text


def _batches(docs, max_docs: int, max_chars: int):
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Progress:
    """Files done and tokens so far, through io.progress (a tqdm bar on a terminal, a line every
    10 s in a log, silent under --quiet), and one closing line with the totals."""

    def __init__(self, enabled: bool, num_files: int):
        from flexmoe.io.progress import Progress

        self.bar = Progress("prepare-data", num_files, unit="files", quiet=None if enabled else True)
        self.done = 0

    def show(self, files_done: int, num_tokens: int, *, final: bool = False) -> None:
        self.bar.advance(files_done - self.done)
        self.done = files_done
        if final:
            self.bar.finish(f"{files_done}/{self.bar.total} files, {num_tokens:,} tokens")

    def end_line(self) -> None:
        """Close the bar of a run that failed midway, so its error starts on its own line."""
        self.bar.finish(None)


def _tokenize_files(
    files: list[Path], tokenizer: Any, writer: _ShardWriter, tail: list[int], progress: _Progress,
    users: _UserIds | None = None, **doc_kw: Any
) -> tuple[int, int, list[dict[str, Any]]]:
    """Stream every document of `files` through the tokenizer into `writer` (and, with `users`,
    each document's user into it)."""
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    vocab_size = int(tokenizer.vocab_size)
    num_tokens = num_documents = 0
    sources = []
    for done, path in enumerate(files):
        docs = iter_documents(path, **doc_kw) if users is None else users.take(
            iter_user_documents(path, text_field=doc_kw["text_field"], user_field=users.field))
        for batch in _batches(docs, _BATCH_DOCS, _BATCH_CHARS):
            ids: list[int] = []
            for doc_ids in encode_batch(batch):
                ids.extend(doc_ids)
                ids.extend(tail)
            tokens = np.asarray(ids, dtype=np.int64)
            bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
            if bad.size:
                raise DataError(f"{path}: tokenizer {tokenizer!r} produced id {int(bad[0])} outside vocab_size {vocab_size}; fix the tokenizer")
            if users is not None and int((tokens == tail[0]).sum()) != len(batch):
                # user ids are matched to documents by counting eos-terminated stretches
                # (data/units.py): an eos inside a text would shift every later document's user
                raise DataError(f"{path}: a document's text tokenizes to the eos id {tail[0]} itself, which would split "
                                "it and misalign the user ids; remove the end-of-text marker from the text")
            writer.add(tokens)
            num_tokens += int(tokens.size)
            num_documents += len(batch)
            progress.show(done, num_tokens)
        sources.append({"path": str(path.resolve()), "sha256": sha256_file(path), "bytes": path.stat().st_size})
        progress.show(done + 1, num_tokens, final=done + 1 == len(files))
    return num_tokens, num_documents, sources


def prepare_data(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Any,
    *,
    dtype: str = "auto",
    shard_tokens: int = 1 << 24,
    text_field: str = "text",
    csv_fields: list[str] | None = None,
    csv_newline_escape: str | None = "\\n",
    append_eos: bool = True,
    domain: str | None = None,
    user_field: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    overwrite_flag: str = "overwrite=True",
) -> dict[str, Any]:
    """Tokenize `inputs` into `out_dir/shard-NNNNN.npy` shards and `out_dir/manifest.json`.

    Documents (see `iter_documents`) are concatenated in input order, each followed by eos
    when `append_eos`. In csv cells each `csv_newline_escape` becomes a line break (AG News as
    shipped marks breaks with a lone backslash: pass "\\" for it). Everything is built in a
    temp directory beside `out_dir` and renamed into place, so `out_dir` never holds a
    half-written dataset. `tokenizer` is a tokenizer object or anything `load_tokenizer`
    accepts. An `out_dir` that is, holds or sits inside an input is refused, and a non-empty one
    unless `overwrite` (`overwrite_flag`: how the caller spells that option, for the message).

    `user_field` (jsonl inputs only): the record field holding each document's user id. Each
    document's user, as a dense id 0..U-1 in order of first appearance, goes to
    `out_dir/user_ids.npy` (int64, one per document, in stream order), and the manifest's `users`
    records the field, U, the file and its sha256: the input of `privacy.unit=user`. Every record
    must carry the field. Returns the manifest.
    """
    if isinstance(tokenizer, (str, Path, dict)):
        tokenizer = load_tokenizer(tokenizer)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be >= 1; use a positive shard size")
    np_dtype = choose_dtype(dtype, int(tokenizer.vocab_size))
    eos_id = getattr(tokenizer, "eos_id", None)
    if append_eos and eos_id is None:
        raise DataError(f"tokenizer {tokenizer!r} has no eos token; pass append_eos=False or use a tokenizer with one")
    if user_field is not None and not (append_eos and user_field):
        raise DataError("user_field needs a non-empty field name and append_eos=True: user ids are matched to the "
                        "documents the eos after each one delimits")
    out_dir, inputs = Path(out_dir).expanduser(), list(inputs)
    # Inputs first, as given and as expanded: `prepare-data corpus --out corpus --overwrite`
    # would otherwise replace the corpus with its own shards.
    check_disjoint(out_dir, inputs, "the output directory", DataError)
    files = expand_inputs(inputs)
    check_disjoint(out_dir, files, "the output directory", DataError)
    check_output_dir(out_dir, overwrite, overwrite_flag, DataError)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)

    tmp = make_temp_dir(out_dir, "tmp")
    shown = _Progress(progress, len(files))
    try:
        writer = _ShardWriter(tmp, np_dtype, shard_tokens)
        users = _UserIds(user_field) if user_field is not None else None
        num_tokens, num_documents, sources = _tokenize_files(
            files,
            tokenizer,
            writer,
            [eos_id] if append_eos else [],
            shown,
            users,
            text_field=text_field,
            csv_fields=csv_fields,
            csv_newline_escape=csv_newline_escape,
        )
        if num_documents == 0:
            raise DataError(
                f"inputs ({len(files)} files, first {files[0]}) hold no non-empty documents; check the files or text_field/csv_fields"
            )
        manifest = {
            "format": FORMAT,
            "domain": domain,
            "tokenizer": tokenizer.spec(),
            "dtype": np_dtype.name,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "append_eos": append_eos,
            **({"eos_id": int(eos_id)} if append_eos else {}),  # where each document ends (privacy.unit=document)
            "shards": writer.close(),
            "sources": sources,
        }
        if users is not None:
            manifest["users"] = _write_user_ids(tmp, users, num_documents)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        check_output_dir(out_dir, overwrite, overwrite_flag, DataError)  # someone may have written there meanwhile
        replace_dir(tmp, out_dir)
    except BaseException:
        shown.end_line()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_user_ids(out: Path, users: _UserIds, num_documents: int) -> dict[str, Any]:
    """`out/user_ids.npy` (no pickle: a plain int64 array) and the manifest's `users` record."""
    if len(users.ids) != num_documents:  # the tokenizer loop wrote a document without its user: a bug
        raise RuntimeError(f"{len(users.ids)} user ids for {num_documents} documents")
    path = out / USER_IDS_NAME
    np.save(path, np.frombuffer(users.ids, dtype=np.int64), allow_pickle=False)
    return {"field": users.field, "num_users": len(users.index), "path": USER_IDS_NAME, "sha256": sha256_file(path)}
