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
from flexmoe.io.files import atomic_output_dir, sha256_file


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
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{n}: not JSON ({e.msg})") from e
                if not isinstance(rec.get("messages"), list):
                    raise DataError(f"{f}:{n}: expected a 'messages' list")
                yield f, n, rec["messages"]


def prepare_sft(inputs: list[str | Path], out_dir: str | Path, tokenizer, *, overwrite: bool = False) -> dict:
    """Write `tokens.npy`, `loss_mask.npy` (uint8), `doc_starts.npy` and `manifest.json`."""
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for _, _, messages in _examples(inputs):
        t, m = encode_chat(messages, tokenizer)
        starts.append(len(ids))
        ids += t
        mask += m
    if not ids:
        raise DataError(f"{', '.join(map(str, inputs))}: no chat examples found")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    with atomic_output_dir(out_dir, overwrite=overwrite, error=DataError) as tmp:
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
        self.data_dir, self.seq_len = Path(data_dir), seq_len
        mpath = self.data_dir / "manifest.json"
        if not mpath.is_file():
            raise DataError(f"{mpath}: missing; run prepare_sft first")
        self.manifest = json.loads(mpath.read_text())
        if verify:
            for name, digest in self.manifest["files"].items():
                if sha256_file(self.data_dir / name) != digest:
                    raise DataError(f"{self.data_dir / name}: sha256 does not match {mpath}; re-run prepare_sft")
        self.tokens = np.load(self.data_dir / "tokens.npy", mmap_mode="r")
        self.mask = np.load(self.data_dir / "loss_mask.npy", mmap_mode="r")
        doc = np.zeros(len(self.tokens), dtype=np.int64)
        doc[np.load(self.data_dir / "doc_starts.npy")[1:]] = 1
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
