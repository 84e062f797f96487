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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # imported where used: merge reads this module without torch
    import torch

from flexmoe.io.fingerprint import bind_expert_hashes, expert_tensor_sha256, verify_expert_hashes  # noqa: F401
from flexmoe.io.log import get_logger
from flexmoe.io.model_dir import META, CheckpointError
from flexmoe.io.schema import CONSENT, USES, check, date_rule

log = get_logger(__name__)
PUBLIC_CONSENT = {"allowed_uses": ["any"], "expires": None}


def make_consent(allowed_uses: Iterable[str] | None, expires: str | None = None, *,
                 where: str = "consent") -> dict[str, Any] | None:
    """Checked consent record, or None when no use is given. `expires`: ISO date, last valid day."""
    if isinstance(allowed_uses, str):  # iterating a string would give its letters
        raise ValueError(f"{where}: allowed uses must be a list of uses, got the string {allowed_uses!r}")
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
    """A `datetime.date` from an ISO `YYYY-MM-DD` string (or a date); nothing looser is read as a date."""
    if isinstance(value, datetime.date):
        return value
    if not isinstance(value, str) or date_rule(value):
        raise ValueError(f"{where}={value!r} is not a date; write YYYY-MM-DD")
    return datetime.date.fromisoformat(value)


def covers(consent: dict[str, Any] | None, use: str, today: datetime.date) -> bool:
    """True when the record allows `use` on `today` (the expiry day itself still counts).

    Uses match exactly: the record is schema-checked first, so `allowed_uses` is a list of known
    uses (a string would make `in` a substring test: "commercial" in "noncommercial")."""
    if not consent:
        return False
    check(consent, CONSENT, "consent record")
    uses = consent["allowed_uses"]
    if use not in uses and "any" not in uses:
        return False
    expires = consent.get("expires")
    return expires is None or today <= parse_date(expires, where="consent expires")


def consent_mask(experts: Sequence[dict[str, Any]], use: str, today: str | datetime.date | None = None) -> torch.Tensor:
    """Bool `[E]`: True where the expert's consent covers `use` on `today` (default: today, UTC)."""
    if use not in USES or use == "any":
        raise ValueError(f"use={use!r} is not one of {', '.join(u for u in USES if u != 'any')}")
    import torch  # here: merge reads this module's records without torch

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
        if len(experts) > 1 and not bool(allowed[1:].any()):
            log.warning(f"use={use}: no owner's expert consents to this use; only the public expert runs")
    if mask is not None and bool(mask.all()):
        return None
    return mask


# --- binding consent to tensors ----------------------------------------------------------------
# The hashes live in io/fingerprint.py (every reader of a model checks them); re-exported here.

def add_tensor_hashes(experts: list[dict[str, Any]], sd: dict[str, torch.Tensor],
                      num_layers: int) -> list[dict[str, Any]]:
    """The experts list with each entry's `tensor_sha256` set from `sd` (see io.fingerprint)."""
    return bind_expert_hashes(experts, sd, num_layers)


def load_for_use(model_dir: str | Path, *, use: str | None = None, opt_out: Iterable[str] = (),
                 today: str | datetime.date | None = None, verify: bool = True):
    """Load a model checked file by file and expert by expert (unless `verify` is False: the
    caller checked it already), with the mask for this request.

    Returns (model, cfg, meta, mask); pass `mask` as `expert_mask` to every forward."""
    from flexmoe.io.model_dir import load_model_dir
    from flexmoe.model import Transformer

    cfg, sd, meta = load_model_dir(model_dir, verify=verify)  # file sha256s and each tensor_sha256
    experts = meta.get("experts") or []
    if not cfg.is_moe and (use is not None or list(opt_out)):
        raise ValueError(f"{model_dir}: a dense model has no experts to select by use= or opt-out")
    if cfg.is_moe and len(experts) != cfg.num_experts:
        raise CheckpointError(f"{Path(model_dir) / META}: lists {len(experts)} experts for "
                              f"num_experts={cfg.num_experts}")
    mask = active_mask(experts, use=use, opt_out=opt_out, today=today) if cfg.is_moe else None
    model = Transformer(cfg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # weights of other shapes than config.json says: one line, not a traceback
        raise CheckpointError(f"{Path(model_dir) / 'model.safetensors'}: tensors do not fit its config.json "
                              f"({str(e).splitlines()[0]})") from e
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
