"""flexmoe: a training stack for FlexOlmo-style mixture-of-experts language models."""

__version__ = "0.1.0"
