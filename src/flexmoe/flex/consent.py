"""Consent registry: each owner's terms travel with its expert, and loading honours them.

An expert package's manifest carries `consent` = {"allowed_uses": [...], "expires": "YYYY-MM-DD"
or null}; merge copies it into the merged model's flexmoe.json `experts` list together with a
`tensor_sha256` of that slot's FFN tensors and router row. Loading with `use=` (and a date)
activates only experts whose consent covers that use on that date; the others are masked exactly
as an opt-out is (router logit -inf), so the model computes what a merge without them computes.
The per-expert hash binds each consent record to its tensors: an expert swapped into another
slot, or altered, fails the check on load even when the file-level sha256s were rewritten.

An expert with no consent record is covered by no use (a registry says yes explicitly). Slot 0,
the public model, is unrestricted unless the public model's flexmoe.json carries `consent`.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from flexmoe.io.model_dir import META, CheckpointError
from flexmoe.io.keys import EXPERT_WEIGHTS, experts_key, router_weight_key

USES = ("research", "commercial", "evaluation", "education", "any")  # "any": every use
PUBLIC_CONSENT = {"allowed_uses": ["any"], "expires": None}


def make_consent(allowed_uses: Iterable[str] | None, expires: str | None = None, *,
                 where: str = "consent") -> dict[str, Any] | None:
    """Checked consent record, or None when no use is given. `expires`: ISO date, last valid day."""
    uses = sorted({u.strip() for u in (allowed_uses or []) if u.strip()})
    if not uses:
        if expires:
            raise ValueError(f"{where}: an expiry date without allowed uses consents to nothing; give allowed uses")
        return None
    unknown = [u for u in uses if u not in USES]
    if unknown:
        raise ValueError(f"{where}: unknown use(s) {unknown}; choose from {', '.join(USES)}")
    day = parse_date(expires, where=f"{where} expires").isoformat() if expires else None
    return {"allowed_uses": uses, "expires": day}


def parse_date(value: str | datetime.date, *, where: str = "date") -> datetime.date:
    """A `datetime.date` from an ISO `YYYY-MM-DD` string (or a date)."""
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError as e:
        raise ValueError(f"{where}={value!r} is not a date; write YYYY-MM-DD") from e


def covers(consent: dict[str, Any] | None, use: str, today: datetime.date) -> bool:
    """True when the record allows `use` on `today` (the expiry day itself still counts)."""
    if not consent:
        return False
    uses = consent.get("allowed_uses") or []
    if use not in uses and "any" not in uses:
        return False
    expires = consent.get("expires")
    return expires is None or today <= parse_date(expires, where="consent expires")


def consent_mask(experts: Sequence[dict[str, Any]], use: str, today: str | datetime.date | None = None) -> torch.Tensor:
    """Bool `[E]`: True where the expert's consent covers `use` on `today` (default: today, UTC)."""
    if use not in USES or use == "any":
        raise ValueError(f"use={use!r} is not one of {', '.join(u for u in USES if u != 'any')}")
    day = parse_date(today, where="date") if today is not None else datetime.datetime.now(datetime.timezone.utc).date()
    return torch.tensor([covers(_consent_of(j, e), use, day) for j, e in enumerate(experts)])


def _consent_of(slot: int, expert: dict[str, Any]) -> dict[str, Any] | None:
    if "consent" in expert:
        return expert["consent"]
    return PUBLIC_CONSENT if slot == 0 else None


def active_mask(experts: Sequence[dict[str, Any]], *, use: str | None = None, opt_out: Iterable[str] = (),
                today: str | datetime.date | None = None) -> torch.Tensor | None:
    """The expert mask for a request: opted-out experts (flex.optout.expert_mask) and, with `use`,
    experts whose consent does not cover it, are off. None when every expert is on."""
    from flexmoe.flex.optout import expert_mask

    mask = expert_mask(list(experts), opt_out)
    if use is not None:
        allowed = consent_mask(experts, use, today)
        mask = allowed if mask is None else mask & allowed
        if not bool(mask.any()):
            raise ValueError(f"use={use}: no expert's consent covers it (and the public one is off); nothing can run")
    if mask is not None and bool(mask.all()):
        return None
    return mask


# --- binding consent to tensors ----------------------------------------------------------------

def expert_tensor_sha256(sd: dict[str, torch.Tensor], slot: int, num_layers: int) -> str:
    """sha256 over one expert slot's FFN tensors and router row in every layer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for i in range(num_layers):
        for key in [experts_key(i, n) for n in EXPERT_WEIGHTS] + [router_weight_key(i)]:
            if key not in sd:
                raise CheckpointError(f"tensor {key} missing: not a merged MoE state dict")
            t = sd[key][slot].detach().contiguous().cpu()
            h.update(f"{key}[{slot}]|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def add_tensor_hashes(experts: list[dict[str, Any]], sd: dict[str, torch.Tensor],
                      num_layers: int) -> list[dict[str, Any]]:
    """The experts list with each entry's `tensor_sha256` set from `sd` (called by merge)."""
    return [dict(e, tensor_sha256=expert_tensor_sha256(sd, j, num_layers)) for j, e in enumerate(experts)]


def verify_expert_hashes(sd: dict[str, torch.Tensor], meta: dict[str, Any], num_layers: int,
                         where: str | Path = "") -> int:
    """Check every `tensor_sha256` in meta's experts against `sd`; returns how many were checked.

    Entries without one (models merged before consent records) are skipped."""
    checked = 0
    for j, e in enumerate(meta.get("experts") or []):
        want = e.get("tensor_sha256")
        if not want:
            continue
        if expert_tensor_sha256(sd, j, num_layers) != want:
            raise CheckpointError(f"{Path(where) / META}: expert slot {j} ({e.get('owner')}/{e.get('domain')}) "
                                  "does not match its tensor_sha256; the expert was swapped or altered, do not use "
                                  "this model")
        checked += 1
    return checked


def load_for_use(model_dir: str | Path, *, use: str | None = None, opt_out: Iterable[str] = (),
                 today: str | datetime.date | None = None):
    """Load a model checked file by file and expert by expert, with the mask for this request.

    Returns (model, cfg, meta, mask); pass `mask` as `expert_mask` to every forward."""
    from flexmoe.io.model_dir import load_model_dir
    from flexmoe.model import Transformer

    cfg, sd, meta = load_model_dir(model_dir, verify=True)
    experts = meta.get("experts") or []
    if cfg.is_moe:
        verify_expert_hashes(sd, meta, cfg.num_layers, model_dir)
    elif use is not None or list(opt_out):
        raise ValueError(f"{model_dir}: a dense model has no experts to select by use= or opt-out")
    if cfg.is_moe and len(experts) != cfg.num_experts:
        raise CheckpointError(f"{Path(model_dir) / META}: lists {len(experts)} experts for "
                              f"num_experts={cfg.num_experts}")
    mask = active_mask(experts, use=use, opt_out=opt_out, today=today) if cfg.is_moe else None
    model = Transformer(cfg)
    model.load_state_dict(sd)
    return model, cfg, meta, mask


def consent_rows(experts: Sequence[dict[str, Any]], use: str | None = None,
                 today: str | datetime.date | None = None) -> list[dict[str, Any]]:
    """Per expert: slot, owner, domain, licence, allowed uses, expiry, hash present, and whether
    `use` (if given) is covered today."""
    day = parse_date(today, where="date") if today is not None else datetime.datetime.now(datetime.timezone.utc).date()
    rows = []
    for j, e in enumerate(experts):
        c = _consent_of(j, e)
        row = {"slot": j, "owner": e.get("owner"), "domain": e.get("domain"), "licence": e.get("licence"),
               "allowed_uses": (c or {}).get("allowed_uses"), "expires": (c or {}).get("expires"),
               "tensor_sha256": bool(e.get("tensor_sha256")), "dp_epsilon": (e.get("dp") or {}).get("epsilon")}
        if use is not None:
            row["active"] = covers(c, use, day)
        rows.append(row)
    return rows
