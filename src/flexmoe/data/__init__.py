"""Data layer: tokenizers, token shards with manifests, windows, mixtures, resumable loaders."""

from __future__ import annotations

from flexmoe.data.corpora import build_builtin_corpora, load_shared_corpora
from flexmoe.data.dataset import Mixture, TokenWindows
from flexmoe.data.errors import DataError
from flexmoe.data.loader import BatchLoader
from flexmoe.data.manifest import load_manifest
from flexmoe.data.prepare import prepare_data
from flexmoe.data.tokenize import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__all__ = [
    "BatchLoader",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "Mixture",
    "TokenWindows",
    "build_builtin_corpora",
    "load_manifest",
    "load_shared_corpora",
    "load_tokenizer",
    "prepare_data",
    "train_bpe",
]
