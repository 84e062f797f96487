"""The one memory estimate per device: what `--dry-run` prints and what `flexmoe train` checks
against the device's memory before it allocates anything.

Counted from the config and the freeze plan alone (the model is built on the meta device):

- weights: frozen tensors in their stored dtype (a bf16 public model's anchor costs 2 bytes a
  parameter and nothing else), trainable tensors as fp32 masters, both sharded over
  dp_shard x tp (expert parallelism borrows its ranks from dp_shard, so experts shard the same);
- gradients and AdamW's two moments: fp32, trainable tensors only, sharded the same way;
- FSDP buffers: two blocks all-gathered at once (the one computing and the one prefetched), in
  `parallel.param_dtype`, plus one block's unsharded gradients;
- activations of one micro-batch: what autograd keeps per token and layer (attention, and the
  MoE dispatch for `top_k` experts), all layers without activation checkpointing; with it, one
  block input per layer plus one layer recomputed;
- the loss: chunked linear + cross-entropy (model/loss.py) keeps one chunk of fp32 logits, the
  unchunked path (a vocab-sharded head under TP) batch x seq x vocab of them, three times.

The per-token activation counts are element counts read off the modules' forward passes
(tests/train/test_memory_estimate.py holds the estimate against peaks measured on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flexmoe.config.model import ModelConfig
from flexmoe.model.flops import param_counts
from flexmoe.model.loss import chunk_tokens_for

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """Bytes per device, by component."""

    weights: float
    grads_and_optimizer: float
    fsdp_buffers: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads_and_optimizer + self.fsdp_buffers + self.activations + self.logits

    def gib(self) -> dict[str, float]:
        """Each component and the total in GiB (what the dry run prints)."""
        parts = {k: v / GIB for k, v in vars(self).items()}
        return {**parts, "total": self.total / GIB}


def degree(parallel: Any, name: str) -> int:
    """A parallel degree of the layout; -1 (what the world size leaves) resolved with $WORLD_SIZE."""
    value = int(getattr(parallel, name, 1) or 1) if parallel is not None else 1
    if value < 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        others = degree(parallel, "dp_replicate") * degree(parallel, "tp") if name == "dp_shard" else 1
        value = max(world // max(others, 1), 1)
    return value


def activation_elements_per_token(mcfg: ModelConfig, *, shared_trainable: bool = True,
                                  frozen_experts: int = 0) -> float:
    """Elements autograd keeps per token for one block (measured on CPU with saved-tensor hooks,
    tests/train/test_memory_estimate.py, and read off the ops).

    With every weight trainable: ~20 x d_model (norms, q/k/v before and after q/k-norm and
    RoPE, attention output, residuals, the dispatch copies) plus, per expert assignment, 4 x d_ff
    (gate, up, their SiLU and product). With the shared layers frozen (the anchor recipe), the
    inputs of frozen projections are not kept (~15 x d_model), and an assignment to a frozen
    expert keeps 3 x d_ff (the product feeds a frozen down projection, which needs no input)."""
    D, Fd = mcfg.d_model, mcfg.d_ff
    if not mcfg.is_moe:
        return float((20 if shared_trainable else 15) * D + 3 * Fd)
    k = min(mcfg.top_k, mcfg.num_experts)
    k_frozen = k * frozen_experts / mcfg.num_experts  # assignments per token that reach frozen slots
    ffn = 4 * Fd * (k - k_frozen) + 3 * Fd * k_frozen
    return float((20 if shared_trainable else 15) * D + ffn + mcfg.num_experts)


def estimate_memory(mcfg: ModelConfig, *, trainable: int, frozen_dtype: str, act_dtype: str, parallel: Any,
                    batch_size: int, seq_len: int, chunked_loss: bool = True, shared_trainable: bool = True,
                    frozen_experts: int = 0) -> MemoryEstimate:
    """Bytes per device of one training step of `batch_size` x `seq_len` tokens per rank.

    `trainable`: trainable parameter count (after the freeze plan); `frozen_dtype`: the stored
    dtype of frozen tensors; `act_dtype`: fp32, or bf16 under autocast."""
    pc = param_counts(mcfg)
    shard = degree(parallel, "dp_shard") * degree(parallel, "tp")
    tp = degree(parallel, "tp")
    frozen = pc.total - trainable
    weights = (frozen * DTYPE_BYTES[frozen_dtype] + trainable * 4) / shard
    opt = trainable * (4 + 8) / shard
    # FSDP all-gathers whole blocks (per tp shard); it exists only with dp_shard > 1.
    block = (pc.total - 2 * mcfg.vocab_size * mcfg.d_model) / max(mcfg.num_layers, 1)
    pbytes = DTYPE_BYTES[getattr(parallel, "param_dtype", "fp32") or "fp32"] if parallel is not None else 4
    fsdp = 0.0
    if shard // tp > 1:
        fsdp = (2 * block + block * trainable / max(pc.total, 1)) * pbytes / tp
    tokens = batch_size * seq_len
    per_layer = activation_elements_per_token(mcfg, shared_trainable=shared_trainable, frozen_experts=frozen_experts)
    block_input = mcfg.d_model
    ab = DTYPE_BYTES[act_dtype]
    ac = getattr(parallel, "ac", "none") if parallel is not None else "none"
    L = mcfg.num_layers
    if ac == "full":
        kept = L * block_input + per_layer
    elif ac == "selective":
        every = max(int(getattr(parallel, "ac_every", 2) or 2), 1)
        wrapped = (L + every - 1) // every
        kept = wrapped * block_input + (L - wrapped) * per_layer + per_layer
    else:
        kept = L * per_layer
        if not shared_trainable:  # frozen embeddings: layer 0's attention needs no gradient, keeps nothing
            kept -= 15 * mcfg.d_model
    acts = tokens * (kept + 2 * mcfg.d_model) * ab / tp  # + embedding output and final norm
    if chunked_loss:  # one chunk of fp32 logits, turned into its gradient in place (model/loss.py)
        logits = min(tokens, chunk_tokens_for(mcfg.vocab_size)) * mcfg.vocab_size * 4 / tp
    else:  # the head's output, its fp32 copy and that copy's gradient
        logits = tokens * mcfg.vocab_size * (4 + 4 + ab) / tp
    return MemoryEstimate(weights=weights, grads_and_optimizer=opt, fsdp_buffers=fsdp, activations=acts,
                          logits=logits)


def check_fits(est: MemoryEstimate, device_memory_gib: float, what: str = "this layout") -> None:
    """Refuse (ValueError, one line naming the settings to change) when the estimate exceeds the
    device memory; `device_memory_gib` <= 0 skips the check."""
    if device_memory_gib <= 0 or est.total <= device_memory_gib * GIB:
        return
    g = est.gib()
    top = max((k for k in g if k != "total"), key=g.get)
    raise ValueError(
        f"{what} needs an estimated {g['total']:.1f} GiB per device (largest: {top} {g[top]:.1f} GiB) but "
        f"trainer.device_memory_gib={device_memory_gib:g}; lower data.batch_size (raise trainer.grad_accum), "
        f"set parallel.ac=full, parallel.param_dtype=bf16, or add ranks (parallel.dp_shard / parallel.tp)")
