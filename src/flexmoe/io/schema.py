"""Typed schemas of the JSON records that cross an organisation, checked on every read.

An expert package's `manifest.json`, a model directory's `flexmoe.json` (and the one export-hf
writes into a Hugging Face directory), and the consent records inside both come from someone
else. Each read checks the record against its schema here before any field is used: JSON types,
required and optional fields, allowed values, nested records, and the format version. A record
that fails is refused with one line naming the file and the field, so a wrong type never turns
into a traceback deep inside merge or eval.

A schema is a `Record` (field name -> `Field`); a `Field` gives the JSON type(s) a value may
have, whether it must be present, the values it may take, a nested record or element spec, and
an extra rule. No dependency beyond the standard library.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Union

from flexmoe.io.digests import record_rule
from flexmoe.io.errors import CheckpointError

# /2: a files entry may record parts (io.digests), an expert record may carry tensor_sha256_format 2
# (io.fingerprint). Readers take both versions; writers write the newest.
PACKAGE_FORMATS = ("flexmoe-expert-package/1", "flexmoe-expert-package/2")
MODEL_FORMATS = ("flexmoe-model/1", "flexmoe-model/2")
PACKAGE_FORMAT, MODEL_FORMAT = PACKAGE_FORMATS[-1], MODEL_FORMATS[-1]
# The uses a consent record may name ("any": every use). Requests name one of them, minus "any".
USES = ("research", "commercial", "evaluation", "education", "any")
RESERVED_NAMES = ("public",)  # slot 0 of every merged model; no owner or domain may take it
DP_FIELDS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sampling_rate", "steps")

_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object", type(None): "null"}


@dataclass(frozen=True)
class Field:
    """One field: its JSON type(s), presence, allowed values and what nests inside it."""

    types: tuple[type, ...]
    required: bool = True
    choices: tuple[Any, ...] = ()
    record: "Record | None" = None  # an object with these fields
    items: "Spec | None" = None  # every element of a list
    values: "Spec | None" = None  # every value of an object with free (string) keys
    rule: Callable[[Any], str | None] | None = None  # returns why a value is wrong, or None
    version: bool = False  # a format version: a wrong value means another flexmoe wrote the file


@dataclass(frozen=True)
class Record:
    """An object's fields; `open` records accept fields they do not name (left unchecked)."""

    fields: dict[str, Field]
    open: bool = False


Spec = Union[Field, Record]


def _f(*types: type | None, required: bool = True, **kw: Any) -> Field:
    """Shorthand: `_f(str, None, required=False)` accepts a string or null, and may be absent."""
    return Field(tuple(type(None) if t is None else t for t in types), required=required, **kw)


def check(value: Any, spec: Spec, where: str | Path, error: type[ValueError] = CheckpointError) -> Any:
    """Return `value` when it fits `spec`; else raise `error` naming `where` (the file) and the field."""
    _check(value, spec, "", where, error)
    return value


def read_record(path: str | Path, spec: Spec, error: type[ValueError] = CheckpointError) -> Any:
    """Read the JSON file at `path` and check it against `spec` (see `check`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise error(f"{path}: missing" if not path.exists() else f"{path}: not a plain file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    return check(value, spec, path, error)


def _check(value: Any, spec: Spec, at: str, where: str | Path, error: type[ValueError]) -> None:
    if isinstance(spec, Record):
        if not isinstance(value, dict):
            raise error(f"{where}: {_name(at)} must be an object, found {_json_type(value)}")
        for key, fld in spec.fields.items():
            if key not in value:
                if fld.required:
                    raise error(f"{where}: missing field {_join(at, key)!r}")
                continue
            _check(value[key], fld, _join(at, key), where, error)
        unknown = sorted(set(value) - set(spec.fields)) if not spec.open else []
        if unknown:
            raise error(f"{where}: unknown field {_join(at, unknown[0])!r} (this flexmoe reads "
                        f"{', '.join(sorted(spec.fields))})")
        return
    if not _is(value, spec.types):
        raise error(f"{where}: field {at!r} must be {' or '.join(_JSON_NAMES[t] for t in spec.types)}, "
                    f"found {_json_type(value)}")
    if spec.choices and value not in spec.choices:
        if spec.version:
            raise error(f"{where}: field {at!r} is {value!r}; this flexmoe reads only {', '.join(spec.choices)} "
                        "(written by another flexmoe version?)")
        raise error(f"{where}: field {at!r} is {value!r}, not one of {', '.join(map(str, spec.choices))}")
    if value is None:
        return
    if spec.record is not None:
        _check(value, spec.record, at, where, error)
    if spec.items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, spec.items, f"{at}[{i}]", where, error)
    if spec.values is not None and isinstance(value, dict):
        for k, v in value.items():
            _check(v, spec.values, _join(at, k), where, error)
    why = spec.rule(value) if spec.rule is not None else None
    if why:
        raise error(f"{where}: field {at!r} {why}")


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # JSON has no bool/int overlap: true is not 1. A number field takes integers too, finite only.
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    if isinstance(value, float) and float in types:
        return math.isfinite(value)
    return any(type(value) is t for t in types if t is not float)


def _json_type(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else str(key)


def _name(at: str) -> str:
    return f"field {at!r}" if at else "the record"


# --- rules -----------------------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def sha256_rule(value: str) -> str | None:
    """A hex sha256 digest (64 lower-case hex digits)."""
    return None if _HEX64.match(value) else f"is not a sha256 (64 hex digits): {value[:80]!r}"


def date_rule(value: str | None) -> str | None:
    """An ISO date, YYYY-MM-DD, that exists."""
    if value is None:
        return None
    try:
        if _DATE.match(value):
            datetime.date.fromisoformat(value)
            return None
    except ValueError:
        pass
    return f"is {value!r}, not a date; write YYYY-MM-DD"


def name_rule(value: str) -> str | None:
    """An owner or domain name: non-empty, no surrounding space, no comma (lists split on it), printable."""
    if not value.strip() or value != value.strip():
        return f"is {value!r}: a name must be non-empty with no surrounding spaces"
    if "," in value or not value.isprintable() or len(value) > 200:
        return f"is {value[:80]!r}: a name may not contain commas or control characters, nor pass 200 characters"
    return None


def reserved_rule(value: str) -> str | None:
    """A name an expert package may take: `name_rule`, and not a reserved name (slot 0's `public`)."""
    why = name_rule(value)
    if why is None and value.strip().lower() in RESERVED_NAMES:
        why = f"is {value!r}, reserved for the public model (slot 0); choose another name"
    return why


def relpath_rule(value: str) -> str | None:
    """A file name inside the directory: relative, no `..`, no `.` parts, no backslashes."""
    p = PurePosixPath(value)
    if not value or p.is_absolute() or "\\" in value or any(part in ("..", ".", "") for part in value.split("/")):
        return f"names {value!r}, which is not a plain file name inside the directory"
    return None


def _file_names(value: dict[str, Any]) -> str | None:
    bad = next((k for k in value if relpath_rule(k)), None)
    return None if bad is None else f"lists {bad!r}, which is not a plain file name inside the directory"


def _nonneg(value: float) -> str | None:
    return None if value >= 0 else f"is {value}, must be >= 0"


def _positive(value: int) -> str | None:
    return None if value > 0 else f"is {value}, must be > 0"


def _uses(value: list[str]) -> str | None:
    if not value:
        return "is empty: a consent record names at least one use (leave `consent` null to consent to none)"
    return None if len(set(value)) == len(value) else f"names a use twice: {value}"


# --- the records ---------------------------------------------------------------------------------

CONSENT = Record({
    "allowed_uses": _f(list, items=_f(str, choices=USES), rule=_uses),
    "expires": _f(str, None, rule=date_rule),
})

DP = Record({k: _f(float, rule=_nonneg) for k in DP_FIELDS}, open=True)

# The budget of a differentially private n-gram profile (`flexmoe router-embed --dp-epsilon`,
# data/private_ngrams.py), and the total that basic composition gives with the training's `dp`.
PROFILE_DP = Record({
    "epsilon": _f(float, rule=lambda v: None if v > 0 else f"is {v}, must be > 0"),
    "delta": _f(float, rule=_nonneg),
    "mechanism": _f(str, choices=("laplace", "gaussian")),
    "unit": _f(str),
    "cap_bucket": _f(float, rule=_nonneg),
    "cap_total": _f(float, rule=_nonneg),
    "noise_scale": _f(float, rule=_nonneg),
}, open=True)
PRIVACY_TOTAL = Record({"epsilon": _f(float, rule=_nonneg), "delta": _f(float, rule=_nonneg),
                        "composition": _f(str)}, open=True)

FILES = _f(dict, values=_f(str, dict, rule=record_rule), rule=_file_names)

PACKAGE_MANIFEST = Record({
    "format": _f(str, choices=PACKAGE_FORMATS, version=True),
    "owner": _f(str, rule=reserved_rule),
    "domain": _f(str, rule=reserved_rule),
    "licence": _f(str, required=False),
    "base_fingerprint": _f(str, rule=sha256_rule),
    "tokens_seen": _f(int, None, required=False, rule=lambda v: None if v is None else _nonneg(v)),
    "dp": _f(dict, None, required=False, record=DP),
    "profile_dp": _f(dict, None, required=False, record=PROFILE_DP),
    "privacy_total": _f(dict, None, required=False, record=PRIVACY_TOTAL),
    "consent": _f(dict, None, required=False, record=CONSENT),
    "shape": _f(dict, record=Record({k: _f(int, rule=_positive) for k in ("num_layers", "d_model", "d_ff")})),
    "router_bias": _f(bool, required=False),
    "stage": _f(str, None, required=False),
    "shared": _f(list, required=False, items=_f(str)),
    "created": _f(str, required=False),
    "files": FILES,
})

EXPERT_ENTRY = Record({
    "slot": _f(int, required=False, rule=_nonneg),
    "owner": _f(str, rule=name_rule),
    "domain": _f(str, rule=name_rule),
    "licence": _f(str, None, required=False),
    "package_sha256": _f(str, None, required=False, rule=lambda v: None if v is None else sha256_rule(v)),
    "tensor_sha256": _f(str, required=False, rule=sha256_rule),
    "tensor_sha256_format": _f(int, required=False, choices=(1, 2)),  # io.fingerprint; absent: 1
    "tokens_seen": _f(int, None, required=False),
    "dp": _f(dict, None, required=False, record=DP),
    "consent": _f(dict, None, required=False, record=CONSENT),
    "source": _f(str, None, required=False),
    "removed": _f(str, required=False),
}, open=True)

# A public model names its shipped router row file; an owner's model may carry its n-gram
# profile's DP budget (from branch to training to package).
_ROUTER_FILE = Record({"router_public": _f(str, required=False, rule=relpath_rule),
                       "profile_dp": _f(dict, None, required=False, record=PROFILE_DP)}, open=True)

MODEL_META = Record({
    "format": _f(str, required=False, choices=MODEL_FORMATS, version=True),
    "kind": _f(str, required=False, choices=("public", "anchor", "merged", "moe")),
    "files": FILES,
    "fingerprint": _f(str, required=False, rule=sha256_rule),
    "base_fingerprint": _f(str, required=False, rule=sha256_rule),
    "experts": _f(list, None, required=False, items=EXPERT_ENTRY),
    "removed": _f(list, None, required=False, items=EXPERT_ENTRY),
    "router_embedding": _f(dict, None, required=False, record=_ROUTER_FILE),
    "consent": _f(dict, None, required=False, record=CONSENT),
    "dp": _f(dict, None, required=False, record=DP),
    "tokenizer": _f(str, dict, None, required=False),
    "tokens_seen": _f(int, None, required=False),
    "owner": _f(str, None, required=False),
    "domain": _f(str, None, required=False),
    "licence": _f(str, None, required=False),
    "stage": _f(str, None, required=False),
}, open=True)

# flexmoe.json inside a Hugging Face directory (written by export-hf): names and extras, no hashes.
HF_META = Record({
    "format": _f(str, required=False, choices=MODEL_FORMATS, version=True),
    "experts": _f(list, None, required=False, items=EXPERT_ENTRY),
    "removed": _f(list, None, required=False, items=EXPERT_ENTRY),
    "native_only": _f(str, None, required=False, rule=lambda v: None if v is None else relpath_rule(v)),
    "router_embedding": _f(dict, None, required=False, record=_ROUTER_FILE),
    "fingerprint": _f(str, required=False, rule=sha256_rule),
    "base_fingerprint": _f(str, required=False, rule=sha256_rule),
}, open=True)


# config.json of a Hugging Face Olmo2 / FlexOlmo directory: the fields flexmoe reads, typed (the
# architecture itself is checked by hf_dir.config_from_hf; the rest of the file is transformers').
_POS = _f(int, rule=_positive)
HF_CONFIG = Record({
    "architectures": _f(list, required=False, items=_f(str)),
    "vocab_size": _POS, "hidden_size": _POS, "num_hidden_layers": _POS, "num_attention_heads": _POS,
    "intermediate_size": _POS,
    "num_key_value_heads": _f(int, None, required=False, rule=lambda v: None if v is None else _positive(v)),
    "head_dim": _f(int, None, required=False, rule=lambda v: None if v is None else _positive(v)),
    "max_position_embeddings": _f(int, required=False, rule=_positive),
    "rope_theta": _f(float, required=False), "rms_norm_eps": _f(float, required=False),
    "initializer_range": _f(float, required=False),
    "rope_parameters": _f(dict, None, required=False), "rope_scaling": _f(dict, None, required=False),
    "num_experts": _f(int, required=False, rule=_nonneg), "num_experts_per_tok": _f(int, required=False, rule=_positive),
    "norm_topk_prob": _f(bool, required=False), "tie_word_embeddings": _f(bool, required=False),
    "pad_token_id": _f(int, None, required=False), "eos_token_id": _f(int, list, None, required=False),
}, open=True)
