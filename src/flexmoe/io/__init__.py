"""The bottom layer: storage formats and identity.

Native model directories (config.json, safetensors, flexmoe.json), Hugging Face directories read
as lazy tensors, byte-span streaming, atomic writes and sha256, the fingerprint, and `keys`, the
one parameter-name schema every other layer uses. Nothing here imports a layer above `config`.
"""
