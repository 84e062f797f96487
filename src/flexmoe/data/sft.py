"""Supervised fine-tuning data: chat-formatted jsonl -> packed token windows with a loss mask on
assistant tokens only and per-example document ids (attention stays inside each example).

Each jsonl line holds `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}`.
Rendering uses a built-in template (`<|role|>` headers) or, for a Hugging Face tokenizer
directory whose tokenizer_config.json has a `chat_template`, that template via jinja2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from flexmoe.data.errors import DataError
from flexmoe.io.files import atomic_output_dir, check_disjoint, check_output_dir, sha256_file


def render_simple(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Segments `(text, trained)`: headers and non-assistant turns untrained, assistant text trained."""
    out: list[tuple[str, bool]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(f"chat message {m!r}: needs role system|user|assistant and string content")
        out.append((f"<|{role}|>\n", False))
        out.append((content + "\n", role == "assistant"))
    return out


def encode_chat(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and a per-token 0/1 mask (1 = the model is trained to produce this token)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in render_simple(messages):
        t = tokenizer.encode(text)
        ids += t
        mask += [int(trained)] * len(t)
    if any(m.get("role") == "assistant" for m in messages) and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)  # learning to stop is part of the assistant's turn
        mask.append(1)
    return ids, mask


def _examples(files: Iterable[str | Path]) -> Iterable[tuple[Path, int, list[dict[str, Any]]]]:
    for f in map(Path, files):
        if not f.is_file():
            raise DataError(f"{f}: no such file")
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text (byte {e.start}); convert it to UTF-8 jsonl") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{n}: not JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
                raise DataError(f"{f}:{n}: expected an object with a 'messages' list")
            if not all(isinstance(m, dict) for m in rec["messages"]):
                raise DataError(f"{f}:{n}: every message must be an object with 'role' and 'content'")
            yield f, n, rec["messages"]


def prepare_sft(inputs: list[str | Path], out_dir: str | Path, tokenizer, *, overwrite: bool = False,
                overwrite_flag: str = "overwrite=True") -> dict:
    """Write `tokens.npy`, `loss_mask.npy` (uint8), `doc_starts.npy` and `manifest.json`."""
    inputs = list(inputs)
    check_disjoint(out_dir, inputs, "the output directory", DataError)
    check_output_dir(out_dir, overwrite, overwrite_flag, DataError)
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for f, n, messages in _examples(inputs):
        try:
            t, m = encode_chat(messages, tokenizer)
        except DataError as e:
            raise DataError(f"{f}:{n}: {e}") from e
        starts.append(len(ids))
        ids += t
        mask += m
    if not ids:
        raise DataError(f"{', '.join(map(str, inputs))}: no chat examples found")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    with atomic_output_dir(out_dir, overwrite=overwrite, error=DataError, flag=overwrite_flag) as tmp:
        np.save(tmp / "tokens.npy", np.asarray(ids, dtype=dtype))
        np.save(tmp / "loss_mask.npy", np.asarray(mask, dtype=np.uint8))
        np.save(tmp / "doc_starts.npy", np.asarray(starts, dtype=np.int64))
        manifest = {"format": "flexmoe-sft/1", "tokenizer": tokenizer.spec(), "num_tokens": len(ids),
                    "num_examples": len(starts), "num_trained_tokens": int(sum(mask)),
                    "files": {n: sha256_file(tmp / n) for n in ("tokens.npy", "loss_mask.npy", "doc_starts.npy")}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class SFTWindows:
    """Packed windows of `seq_len + 1` tokens with the targets' loss mask and document ids."""

    def __init__(self, data_dir: str | Path, seq_len: int, *, verify: bool = True):
        from flexmoe.data.manifest import SFT_FORMAT, member_path, read_manifest_record

        self.data_dir, self.seq_len = Path(data_dir), seq_len
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1; set a positive sequence length")
        mpath = self.data_dir / "manifest.json"
        if not mpath.is_file() and not mpath.is_symlink():
            raise DataError(f"{mpath}: missing; run prepare_sft first")
        self.manifest = read_manifest_record(self.data_dir, (SFT_FORMAT,))
        arrays = {}
        for name, digest in self.manifest["files"].items():
            path = member_path(self.data_dir, name, mpath)
            if not path.is_file():
                raise DataError(f"{path}: listed in {mpath} but missing; re-run prepare-data --format sft")
            if verify and sha256_file(path) != digest:
                raise DataError(f"{self.data_dir / name}: sha256 does not match {mpath}; re-run prepare_sft")
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable array ({e}); re-run prepare-data --format sft") from e
        self.tokens, self.mask = arrays["tokens.npy"], arrays["loss_mask.npy"]
        starts = np.asarray(arrays["doc_starts.npy"])
        n = len(self.tokens) if self.tokens.ndim == 1 else -1
        if (self.tokens.ndim != 1 or self.tokens.dtype not in (np.uint16, np.uint32)
                or self.mask.shape != self.tokens.shape or self.mask.dtype != np.uint8
                or starts.ndim != 1 or starts.dtype.kind not in "iu" or n != self.manifest["num_tokens"]
                or (len(starts) and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n))):
            raise DataError(f"{self.data_dir}: tokens.npy, loss_mask.npy and doc_starts.npy do not fit each other or "
                            f"{mpath} (shapes {self.tokens.shape}, {self.mask.shape}, {starts.shape}); "
                            "re-run prepare-data --format sft")
        doc = np.zeros(len(self.tokens), dtype=np.int64)
        doc[starts[1:]] = 1
        self.doc_ids = np.cumsum(doc)
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"{self.data_dir}: fewer than {seq_len + 1} tokens")

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        a = i * self.seq_len
        sl = slice(a, a + self.seq_len + 1)
        docs = self.doc_ids[sl]
        # a target that starts a new example is not predicted from the previous example
        mask = self.mask[sl][1:] * (docs[1:] == docs[:-1])
        return {"tokens": np.asarray(self.tokens[sl], dtype=np.int64), "loss_mask": mask.astype(np.float32),
                "doc_ids": (docs[:-1] - docs[0]).astype(np.int64)}


def masked_lm_loss(logits_BSV, targets_BS, mask_BS):
    """Mean cross-entropy over trained positions only: masked targets get exactly zero gradient."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1), reduction="none")
    m = mask_BS.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)
