"""Typed configuration schemas (dataclasses) shared by the library, the CLI and Hydra."""

from flexmoe.config.model import ModelConfig

__all__ = ["ModelConfig"]
