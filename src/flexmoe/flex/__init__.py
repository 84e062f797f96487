"""The FlexOlmo lifecycle on plain state dicts and safetensors files: no process groups here."""
