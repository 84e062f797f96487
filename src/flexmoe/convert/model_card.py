"""The model card (README.md with Hugging Face front matter) that every `export-hf` writes.

It states what a downstream user needs before running the release: every expert's owner, domain,
licence, the uses its owner consented to and until when, its DP record, the hash that binds the
record to the expert's tensors, and the experts removed on the way (opt-outs made permanent).
"""

from __future__ import annotations

import json
from typing import Any

from flexmoe.config.model import ModelConfig


def _cell(v: Any) -> str:
    if v is None or v == "" or v == []:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _dp(record: dict[str, Any] | None) -> str:
    if not record:
        return "none"
    parts = [f"eps={record['epsilon']:g}" if isinstance(record.get("epsilon"), (int, float)) else None,
             f"delta={record['delta']:g}" if isinstance(record.get("delta"), (int, float)) else None,
             f"unit={record['unit']}" if record.get("unit") else None,
             f"accountant={record['accountant']}" if record.get("accountant") else None]
    return ", ".join(p for p in parts if p) or "recorded"


def _licence(experts: list[dict[str, Any]]) -> str:
    """The front matter's `license`: the one licence every owner gave, else 'other' (the table says which)."""
    given = {e.get("licence") for e in experts[1:] if e.get("licence")}
    return given.pop().lower() if len(given) == 1 else "other"


def model_card(cfg: ModelConfig, meta: dict[str, Any], *, use: str | None, remote_code: bool) -> str:
    """README.md text for an HF export of the model `cfg`/`meta` (meta: the native flexmoe.json)."""
    experts = list(meta.get("experts") or [])
    tags = ["flexmoe", "flexolmo", "mixture-of-experts" if cfg.is_moe else "dense"]
    front = {"library_name": "transformers", "tags": tags, "license": _licence(experts) if experts else "other",
             "pipeline_tag": "text-generation"}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             "# flexmoe release", ""]
    if cfg.is_moe:
        lines += [f"A FlexOlmo-style mixture of {cfg.num_experts} experts (top-{cfg.top_k}, routing "
                  f"`{cfg.routing}`), d_model {cfg.d_model}, {cfg.num_layers} layers, vocabulary {cfg.vocab_size}. "
                  "Expert 0 is the public model's FFN; every other expert was trained by its owner on data "
                  "that never left them, next to a frozen copy of the public model.", ""]
        if remote_code:
            lines += ["Loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: the "
                      "document routing ships as `modeling_flexmoe_doc.py` in this directory.", ""]
        else:
            lines += ["Loads with `AutoModelForCausalLM.from_pretrained(path)` as `FlexOlmoForCausalLM`.", ""]
        lines += [f"Exported for use: **{use}** (experts whose consent does not cover it were removed)." if use else
                  "Exported without a use: each expert's consent below says what it may be used for.", "",
                  "| slot | owner | domain | licence | allowed uses | expires | DP | tensor_sha256 |",
                  "|---|---|---|---|---|---|---|---|"]
        for j, e in enumerate(experts):
            consent = e.get("consent") or ({"allowed_uses": ["any"]} if j == 0 else {})
            sha = e.get("tensor_sha256")
            lines.append("| " + " | ".join([str(j), _cell(e.get("owner")), _cell(e.get("domain")), _cell(e.get("licence")),
                                            _cell(consent.get("allowed_uses") or "no consent recorded"),
                                            _cell(consent.get("expires")), _dp(e.get("dp")),
                                            f"`{sha[:16]}`" if sha else "-"]) + " |")
        removed = meta.get("removed") or []
        if removed:
            lines += ["", "Removed before this release (an owner opted out, or its consent does not cover the use):", ""]
            lines += [f"- {_cell(r.get('owner'))}/{_cell(r.get('domain'))}, removed {_cell(r.get('removed'))}"
                      for r in removed]
    else:
        lines += [f"A dense OLMo-2-style model, d_model {cfg.d_model}, {cfg.num_layers} layers, vocabulary "
                  f"{cfg.vocab_size}.", ""]
    if meta.get("base_fingerprint"):
        lines += ["", f"Public model fingerprint: `{meta['base_fingerprint']}`."]
    return "\n".join(lines) + "\n"
