"""Model math: plain nn.Modules with no process groups and no file I/O."""

from flexmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
