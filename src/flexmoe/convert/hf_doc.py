"""Hugging Face releases of document-routed merges (`routing=anchor_ngram` or `anchor_top1`).

Transformers' FlexOlmo routes top-k only, so such a release ships its own modeling file
(`remote/modeling_flexmoe_doc.py`, torch + transformers only) and loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. The config names model type
`flexmoe_doc`, which stock transformers does not know: without trust_remote_code it refuses to load
rather than run top-k routing on these weights. The tensors are those of a FlexOlmo export plus,
for anchor_ngram, the n-gram profiles (`doc_router.profiles`, in a shard of their own that
`--dtype` never casts: the routing choices stay exactly the native model's).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import HF_DOC_PROFILES
from flexmoe.io.model_dir import CONFIG, CheckpointError
from flexmoe.io.stream import LazyTensor

REMOTE_CODE = Path(__file__).with_name("remote") / "modeling_flexmoe_doc.py"
MODEL_TYPE = "flexmoe_doc"
ARCHITECTURE = "FlexMoeDocForCausalLM"
DOC_ROUTINGS = ("anchor_ngram", "anchor_top1")


class DocRelease:
    """What export-hf adds for a document-routed merge: the profiles' shard, the config, the code."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.keys = [HF_DOC_PROFILES] if cfg.routing == "anchor_ngram" else []

    def add_tensors(self, hf: dict[str, LazyTensor], native: dict[str, LazyTensor]) -> list[list[str]]:
        """Add the profiles to `hf`; -> the extra shard(s) holding them (written without a cast)."""
        if not self.keys:
            return []
        hf[HF_DOC_PROFILES] = native["domain_ngrams"]
        return [list(self.keys)]

    def config(self, config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """FlexOlmo's config.json -> the release's (model type, auto_map, routing, expert names)."""
        module = REMOTE_CODE.stem
        experts = [{k: e.get(k) for k in ("slot", "owner", "domain")} for e in meta.get("experts") or []]
        return {**config, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
                "auto_map": {"AutoConfig": f"{module}.FlexMoeDocConfig",
                             "AutoModelForCausalLM": f"{module}.{ARCHITECTURE}"},
                "num_experts_per_tok": min(2, self.cfg.num_experts),  # the anchor pair
                "doc_routing": self.cfg.routing, "doc_ngram_buckets": self.cfg.doc_ngram_buckets if self.keys else 0,
                "experts": experts or None, "opt_out": []}

    def write_code(self, out_dir: Path) -> None:
        shutil.copy2(REMOTE_CODE, out_dir / REMOTE_CODE.name)


def doc_release(src: Path, cfg: ModelConfig) -> DocRelease | None:
    """None for top-k (a plain FlexOlmo export); a DocRelease for anchor_ngram / anchor_top1."""
    routing = getattr(cfg, "routing", "topk")
    if not cfg.is_moe or routing == "topk":
        return None
    if routing not in DOC_ROUTINGS:
        raise CheckpointError(f"{src / CONFIG}: model.routing={routing!r} has no Hugging Face release (it routes by "
                              "layer-0 hidden-state centroids); merge again with --routing anchor_ngram "
                              f"(or {', '.join(r for r in ('topk',) + DOC_ROUTINGS if r != 'anchor_ngram')})")
    return DocRelease(cfg)
