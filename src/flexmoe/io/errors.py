"""The error every reader of a checkpoint, package or record raises for a user's input.

It lives in its own module so the lowest readers (schemas, hashes) can raise it without importing
the model-directory code that uses them; `flexmoe.io.model_dir.CheckpointError` is this class.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or package on disk is missing, corrupted or does not fit."""
