"""Distributed layouts: meshes, tensor/expert parallelism, FSDP2, DeepSpeed, one entry point.

`parallelize(model, cfg.parallel, build_mesh(dims, device_type))` applies TP, EP, activation checkpointing, compile
and FSDP in that order; model/ never imports this package.
"""
