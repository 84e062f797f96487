"""FlexOlmo with flexmoe's document routing, for `from_pretrained(..., trust_remote_code=True)`.

`flexmoe export-hf` copies this file into a release of a merge made with `--routing anchor_ngram`
or `anchor_top1`. It needs torch and transformers only. Every MoE layer runs the anchor (expert 0)
plus one domain expert, weighed by a softmax over just those two router logits:

- anchor_ngram: the domain expert whose n-gram profile (`doc_router.profiles`, smoothed
  log-frequencies of hashed token 1- to 4-grams of its owner's data) best explains the tokens so
  far (a causal naive Bayes classifier); the anchor alone when the public profile (slot 0) wins.
- anchor_top1: the domain expert with the largest router logit.

Opt-out: `config.opt_out` (owner or domain names, e.g. `from_pretrained(path,
trust_remote_code=True, opt_out=["code"])`) or the `expert_mask` argument of forward/generate
(bool `[num_experts]`, False = off) masks experts exactly as `flexmoe generate --opt-out` does.

With a KV cache the routing state (the last tokens and the running per-profile score sums) is
kept on the cache object, so decoding costs one profile lookup per token; a cache that has seen
tokens this model did not route (cropped, or filled elsewhere) is refused.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import (FlexOlmoForCausalLM, FlexOlmoMLP, FlexOlmoModel,
                                                              FlexOlmoPreTrainedModel, FlexOlmoTopKRouter)

# Must equal flexmoe.data.ngrams (the release is scored exactly as the native model is).
NGRAM_ORDERS = (1, 2, 3, 4)
_MOD = 2_147_483_647
_MULT = 1_000_003
_SALT = 104_729
ROUTINGS = ("anchor_ngram", "anchor_top1")
_STATE = "flexmoe_doc_state"  # attribute of the KV cache holding the routing state
_CACHE_KW = "cache" if "cache" in inspect.signature(FlexOlmoForCausalLM.forward).parameters else "past_key_values"


class FlexMoeDocConfig(FlexOlmoConfig):
    """FlexOlmo's config plus the document routing: `doc_routing`, `doc_ngram_buckets`,
    `experts` (slot, owner, domain of each expert) and `opt_out` (names switched off)."""

    model_type = "flexmoe_doc"

    doc_routing: str = "anchor_ngram"
    doc_ngram_buckets: int = 0
    experts: list | None = None
    opt_out: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_doc_routing()

    def check_doc_routing(self):
        if self.doc_routing not in ROUTINGS:
            raise ValueError(f"doc_routing={self.doc_routing!r} is not one of {ROUTINGS}")
        if self.doc_routing == "anchor_ngram" and self.doc_ngram_buckets < 1:
            raise ValueError("doc_routing=anchor_ngram needs doc_ngram_buckets > 0")
        active_experts(self)  # unknown opt-out names fail at load, not at the first forward


def active_experts(config) -> list[bool] | None:
    """Per expert, whether it is on (False = switched off by `config.opt_out`); None when nothing is off."""
    off = [o for o in (config.opt_out or []) if o]
    if not off:
        return None
    experts = config.experts or [{"slot": j, "owner": f"expert{j}", "domain": f"expert{j}"}
                                 for j in range(config.num_experts)]
    names = {e["owner"] for e in experts} | {e["domain"] for e in experts}
    unknown = [o for o in off if o not in names]
    if unknown:
        raise ValueError(f"opt_out: unknown expert(s) {unknown}; this model has {sorted(names)}")
    mask = [e["owner"] not in off and e["domain"] not in off for e in experts]
    if not any(mask):
        raise ValueError("opt_out switches off every expert; at least one must stay on")
    return mask


def ngram_buckets(tokens_BS: torch.Tensor, buckets: int) -> torch.Tensor:
    """Hash bucket of the n-gram ending at each position, per order -> `[B, S, len(NGRAM_ORDERS)]`;
    -1 where the row is too short for that order."""
    tok = tokens_BS.long() % _MOD
    B, S = tok.shape
    out = torch.full((B, S, len(NGRAM_ORDERS)), -1, dtype=torch.long, device=tok.device)
    h = torch.zeros_like(tok)
    for n in range(1, max(NGRAM_ORDERS) + 1):
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        h = (prev * _MULT + tok) % _MOD
        if n in NGRAM_ORDERS:
            b = ((h + n * _SALT) % _MOD) % buckets
            out[:, n - 1:, NGRAM_ORDERS.index(n)] = b[:, n - 1:]
    return out


class DocState:
    """Routing state of a batch after the tokens seen so far: the last `max(orders) - 1` token ids,
    the run of real (unpadded) tokens ending at the last one, and the per-profile score sums (fp64,
    so each step adds exactly what a cumulative sum over the whole prefix adds)."""

    def __init__(self, tail_BT: torch.Tensor, run_B: torch.Tensor, score_BE: torch.Tensor, seen: int):
        self.tail_BT, self.run_B, self.score_BE, self.seen = tail_BT, run_B, score_BE, seen

    @classmethod
    def empty(cls, batch: int, experts: int, device) -> "DocState":
        tail = torch.zeros(batch, max(NGRAM_ORDERS) - 1, dtype=torch.long, device=device)
        return cls(tail, torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, experts, dtype=torch.float64, device=device), 0)

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows `idx` (beam search reorders the batch)."""
        self.tail_BT, self.run_B, self.score_BE = (t.index_select(0, idx.to(t.device))
                                                   for t in (self.tail_BT, self.run_B, self.score_BE))


class DocRouter(nn.Module):
    """The n-gram profiles `[num_experts, buckets]` (fp32) and the causal choice they make."""

    def __init__(self, config):
        super().__init__()
        self.register_buffer("profiles", torch.zeros(config.num_experts, config.doc_ngram_buckets, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, tokens_BS, attention_mask, state: DocState, mask_E) -> tuple[torch.Tensor, DocState]:
        """Per position, the winning slot (0: anchor only) -> (`[B, S]`, the state after these tokens)."""
        B, S = tokens_BS.shape
        keep = state.tail_BT.shape[1]
        full = torch.cat([state.tail_BT, tokens_BS.long()], dim=1)
        ids_BSK = ngram_buckets(full, self.profiles.shape[1])[:, keep:]
        # Run of real tokens ending at each position (a pad resets it): an order-n n-gram counts
        # only when its n tokens are all real, as in a window that starts at the first real token.
        real = torch.ones_like(tokens_BS, dtype=torch.bool)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask[:, -S:].to(tokens_BS.device).bool()
        pos = torch.arange(S, device=tokens_BS.device).expand(B, S)
        last_pad = torch.where(real, -1, pos).cummax(1).values
        run_BS = torch.where(last_pad < 0, state.run_B[:, None] + pos + 1, pos - last_pad)
        valid = run_BS[..., None] >= torch.tensor(NGRAM_ORDERS, device=run_BS.device)
        lp_BSKE = self.profiles.float().T[ids_BSK.clamp(min=0)]
        lp_BSE = (lp_BSKE * valid[..., None]).sum(2)
        acc_BSE = torch.cat([state.score_BE[:, None], lp_BSE.double()], dim=1).cumsum(1)[:, 1:]
        scores = acc_BSE.float()
        if mask_E is not None:
            scores = scores.masked_fill(~mask_E.to(scores.device), float("-inf"))
        new = DocState(full[:, -keep:], run_BS[:, -1], acc_BSE[:, -1], state.seen + S)
        return scores.argmax(-1), new


class _Route:
    """What the MoE blocks of one forward pass route by, set by FlexMoeDocForCausalLM.forward."""

    choice_BS: torch.Tensor | None = None
    mask_E: torch.Tensor | None = None
    active = False


class DocMoeBlock(nn.Module):
    """The anchor plus one domain expert per token; experts stored one module each (the layout of
    published FlexOlmo checkpoints), router weights where FlexOlmo keeps them."""

    def __init__(self, config, route: _Route):
        super().__init__()
        self.gate = FlexOlmoTopKRouter(config)
        self.experts = nn.ModuleList(FlexOlmoMLP(config) for _ in range(config.num_experts))
        self._route = [route]  # a list, so the shared object is not registered as a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        route = self._route[0]
        if not route.active:
            raise RuntimeError("FlexMoeDoc layers route by the whole model's input: call FlexMoeDocForCausalLM")
        B, S, D = hidden_states.shape
        x_TD = hidden_states.reshape(-1, D)
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        if route.mask_E is not None:
            logits_TE = logits_TE.masked_fill(~route.mask_E.to(logits_TE.device), float("-inf"))
        if route.choice_BS is None:  # anchor_top1: best domain expert by logit; none when all are masked
            best = logits_TE[:, 1:].max(dim=-1)
            choice_T, anchor_only = best.indices + 1, torch.isinf(best.values)
        else:
            choice_T = route.choice_BS.reshape(-1).to(x_TD.device)
            anchor_only = choice_T == 0
        pair_T2 = torch.stack([logits_TE[:, 0], logits_TE.gather(1, choice_T[:, None]).squeeze(1)], dim=-1)
        w_T2 = pair_T2.softmax(dim=-1)
        w_T2 = torch.where(anchor_only[:, None], torch.tensor([1.0, 0.0], device=w_T2.device), w_T2)
        idx_T2 = torch.stack([torch.zeros_like(choice_T), torch.where(anchor_only, 0, choice_T)], dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e in torch.unique(idx_T2).tolist():  # ascending: the anchor's share is added first
            rows, k = torch.where(idx_T2 == e)
            y = self.experts[e](x_TD[rows]) * w_T2[rows, k, None].to(x_TD.dtype)
            out_TD.index_add_(0, rows, y)
        return out_TD.view(B, S, D)


class FlexMoeDocPreTrainedModel(FlexOlmoPreTrainedModel):
    config_class = FlexMoeDocConfig
    config: FlexMoeDocConfig
    _keep_in_fp32_modules_strict = ["doc_router"]  # profiles in bf16 would change the choices
    _can_compile_fullgraph = False  # routing state lives on the cache object


class FlexMoeDocForCausalLM(FlexMoeDocPreTrainedModel, FlexOlmoForCausalLM):
    """FlexOlmoForCausalLM whose MoE layers route by document (see the module docstring)."""

    def __init__(self, config: FlexMoeDocConfig):
        config.check_doc_routing()  # again: from_pretrained sets keyword overrides (opt_out=...) after init
        FlexMoeDocPreTrainedModel.__init__(self, config)
        self._route_ctx = _Route()
        self.model = FlexOlmoModel(config)
        for layer in self.model.layers:
            layer.mlp = DocMoeBlock(config, self._route_ctx)
        self.doc_router = DocRouter(config) if config.doc_routing == "anchor_ngram" else None
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, expert_mask=None, **kwargs):
        """FlexOlmoForCausalLM.forward plus `expert_mask` (bool `[num_experts]`, False = off; default:
        from `config.opt_out`)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        mask_E = active_experts(self.config) if expert_mask is None else expert_mask
        mask_E = None if mask_E is None else torch.as_tensor(mask_E, dtype=torch.bool)
        if mask_E is not None and mask_E.shape != (self.config.num_experts,):
            raise ValueError(f"expert_mask has shape {tuple(mask_E.shape)}, expected ({self.config.num_experts},)")
        choice = None
        if self.doc_router is not None:
            if input_ids is None:
                raise ValueError("document routing scores token ids: pass input_ids, not inputs_embeds")
            choice, state = self.doc_router(input_ids, attention_mask, self._state(cache, input_ids), mask_E)
            if cache is not None:
                setattr(cache, _STATE, state)
        route = self._route_ctx
        route.choice_BS, route.mask_E, route.active = choice, mask_E, True
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **{_CACHE_KW: cache}, **kwargs)
        finally:
            route.choice_BS, route.mask_E, route.active = None, None, False

    def _state(self, cache, input_ids) -> DocState:
        B = input_ids.shape[0]
        seen = cache.get_seq_length() if cache is not None else 0
        state = getattr(cache, _STATE, None) if cache is not None else None
        if state is None:
            if seen:
                raise ValueError(f"the cache holds {seen} tokens this model did not route; document routing needs "
                                 "the n-gram state of the whole prefix: start from an empty cache")
            return DocState.empty(B, self.config.num_experts, input_ids.device)
        if state.seen != seen or state.tail_BT.shape[0] != B:
            raise ValueError(f"the cache holds {seen} tokens of batch size {B}, but its document-routing state "
                             f"{state.seen} of batch size {state.tail_BT.shape[0]} (a cropped or re-batched "
                             "cache cannot be routed); start from an empty cache")
        return state

    def _reorder_cache(self, cache, beam_idx):
        """Beam search: reorder the routing state with the KV cache."""
        cache.reorder_cache(beam_idx)
        state = getattr(cache, _STATE, None)
        if state is not None:
            state.select(beam_idx)
        return cache

    def opt_out(self, *names: str) -> None:
        """Switch experts off by owner or domain name (none: all on again)."""
        self.config.opt_out = list(names)
        active_experts(self.config)


__all__ = ["FlexMoeDocConfig", "FlexMoeDocForCausalLM"]
