"""The OLMo-2 / FlexOlmo decoder: post-norm blocks, untied LM head, dense or MoE FFN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from flexmoe.config.model import NATIVE_BUFFERS, ModelConfig
from flexmoe.model.attention import Attention
from flexmoe.model.docroute import ngram_choice
from flexmoe.model.ffn import DenseFFN
from flexmoe.model.linear import Linear
from flexmoe.model.loss import cross_entropy_from_logits, linear_cross_entropy
from flexmoe.model.moe import MoE, Routing
from flexmoe.model.norm import RMSNorm
from flexmoe.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when forward took `targets` and the head's loss ran chunked
    aux_loss: torch.Tensor | None = None
    routing: list[Routing] = field(default_factory=list)
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # input of each block's FFN
    loss: torch.Tensor | None = None  # next-token cross-entropy, when forward took `targets`


class Block(nn.Module):
    """`h = x + norm(attn(x))`, `out = h + norm(ffn(h))` (OLMo-2's reordered norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_impl)
        self.ffn = MoE(cfg) if cfg.is_moe else DenseFFN(cfg.d_model, cfg.d_ff)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_impl)

    def attend(self, x, cos, sin, doc_ids=None):
        return x + self.attn_norm(self.attn(x, cos, sin, doc_ids))

    def feed(self, h, expert_mask=None, choice=None):
        ffn_out = self.ffn(h, expert_mask, choice) if isinstance(self.ffn, MoE) else self.ffn(h)
        return h + self.ffn_norm(ffn_out)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_impl)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # The residual stream's dtype when set (training sets fp32: frozen weights may stay bf16
        # while the activations run in fp32); None follows the embedding's dtype.
        self.compute_dtype: torch.dtype | None = None
        self.rope = RotaryEmbedding(cfg.dim_head, cfg.rope_theta)
        if cfg.is_moe:
            # Per-expert mean layer-0 FFN input of its owner's data (slot 0: public data), for
            # routing=anchor_doc. Stored in model.safetensors; absent in HF checkpoints (zeros).
            self.register_buffer("domain_centroids", torch.zeros(cfg.num_experts, cfg.d_model))
            if cfg.doc_ngram_buckets > 0:
                # Per-expert n-gram profiles (log-frequencies, model/docroute.py), for routing=anchor_ngram.
                self.register_buffer("domain_ngrams", torch.zeros(cfg.num_experts, cfg.doc_ngram_buckets))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.is_meta:  # shape-only models (dry runs of 30B+ layouts) hold no values
                continue
            p.copy_(self.init_value(name, p.shape, self.cfg.init_std, gen))

    @staticmethod
    def init_value(name: str, shape, std: float, gen: torch.Generator | None) -> torch.Tensor:
        """The initial value of parameter `name` (in an unfrozen model's order, each call draws
        from `gen`): what reset_parameters copies in, and what a sharded build slices its part of."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("router.bias"):
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * std

    # --- MoE helpers -----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name in NATIVE_BUFFERS:  # absent from HF checkpoints and older native ones: keep zeros
            if hasattr(self, name) and name not in state_dict:
                state_dict = dict(state_dict, **{name: getattr(self, name).detach().clone()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def document_choice(self, h0_BSD: torch.Tensor, expert_mask: torch.Tensor | None) -> torch.Tensor:
        """Per token, the expert whose centroid is nearest the running mean of h0 up to that token
        (causal: token t sees only tokens <= t). 0 means the public centroid won: anchor only."""
        S = h0_BSD.shape[1]
        mean_BSD = h0_BSD.float().cumsum(1) / torch.arange(1, S + 1, device=h0_BSD.device)[None, :, None]
        c_ED = self.domain_centroids.float()
        d2_BSE = (c_ED * c_ED).sum(-1) - 2 * mean_BSD @ c_ED.T  # |m|^2 is the same for every expert
        if expert_mask is not None:
            d2_BSE = d2_BSE.masked_fill(~expert_mask.to(d2_BSE.device), float("inf"))
        return d2_BSE.argmin(-1)

    def set_record_routing(self, on: bool) -> None:
        for m in self.moe_layers():
            m.record_routing = on
            m.last_routing = None

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens_BS: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        *,
        capture_hidden: bool = False,
        last_hidden_only: bool = False,
        doc_ids: torch.Tensor | None = None,
        route_choice: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        """Logits `[B, S, V]` in the activation dtype.

        `expert_mask` (bool `[E]`, False = switched off) masks router logits to -inf: the opt-out.
        `capture_hidden` records each block's FFN input (the router's input) for router embeddings.
        `last_hidden_only` skips the LM head and returns the final normed hidden state as logits.
        `doc_ids` `[B, S]` keeps attention inside each packed example.
        `route_choice` `[B, S]`: the domain expert per position (0 = anchor only) picked outside the
        model, e.g. by a document embedder (flex/docembed.py); `anchor_*` routings only.
        `targets` `[B, S]`: also return the cross-entropy (fp32) in `loss`, weighed by `loss_mask`
        `[B, S]` if given, reduced by `loss_reduction` (mean|sum|none; the mean is over
        `loss_mask`'s sum, or over targets != -100); the logits are then not returned, and not
        materialised: the head runs chunk by chunk (model/loss.py).
        """
        B, S = tokens_BS.shape
        x = self.embed(tokens_BS)
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        cos, sin = self.rope(S, x.device)
        captured: list[torch.Tensor] | None = [] if capture_hidden else None
        choice = None
        if route_choice is not None:
            if not self.cfg.is_moe or self.cfg.routing == "topk":
                raise ValueError(f"route_choice needs an anchor_* routing, not routing={self.cfg.routing!r}")
            if route_choice.shape != tokens_BS.shape:
                raise ValueError(f"route_choice shape {tuple(route_choice.shape)} != tokens {tuple(tokens_BS.shape)}")
            choice = route_choice.to(tokens_BS.device).long()
        elif self.cfg.is_moe and self.cfg.routing == "anchor_ngram":
            choice = ngram_choice(tokens_BS, self.domain_ngrams, expert_mask)
        for i, block in enumerate(self.layers):
            h = block.attend(x, cos, sin, doc_ids)
            if captured is not None:
                captured.append(h)
            if i == 0 and route_choice is None and self.cfg.is_moe and self.cfg.routing == "anchor_doc":
                choice = self.document_choice(h, expert_mask)
            x = block.feed(h, expert_mask, choice)
        x = self.norm(x)
        loss = None
        if targets is not None:
            logits, loss = self._loss(x, targets, loss_mask, loss_reduction)
        else:
            logits = x if last_hidden_only else self.lm_head(x)
        aux = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        return ModelOutput(
            loss=loss,
            logits=logits,
            aux_loss=torch.stack(aux).sum() if aux else None,
            routing=[m.last_routing for m in self.moe_layers() if m.last_routing is not None],
            hidden_states=captured or [],
        )

    def _loss(self, x_BSD, targets_BS, mask_BS, reduction: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, loss) from the final normed hidden states."""
        w = self.lm_head.weight
        # Under FSDP2 the head's weight is the gathered one here (the final norm, run just
        # before, shares its FSDP unit). A DTensor weight is a vocab-sharded head (tensor
        # parallelism, or a head FSDP left sharded) and a ZeRO-3 weight lives gathered only
        # inside lm_head's forward: those keep the full-logits path through the module.
        if isinstance(w, DTensor) or hasattr(w, "ds_id"):
            logits = self.lm_head(x_BSD)
            return logits, cross_entropy_from_logits(logits, targets_BS, loss_mask_N=mask_BS, reduction=reduction)
        return None, linear_cross_entropy(x_BSD, w, targets_BS, loss_mask_N=mask_BS, reduction=reduction)

    # --- parameter accounting -------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
