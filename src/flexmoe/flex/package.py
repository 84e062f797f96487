"""Expert package: the owner's trained expert FFN per layer, its router rows and bias, as
safetensors plus a JSON manifest. It carries no data and nothing shared.

Optionally (`flexmoe package --fit-router`, recipes/owner_router.py) it also carries top-k router
rows the owner fitted on its own data: `fitted_router.{i}` `[d_model]` per layer, recorded as
`fitted_router` in the manifest; `merge --routing topk --calibrate owner` stacks them."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexmoe.config.model import NATIVE_BUFFERS
from flexmoe.io.dtypes import text
from flexmoe.io.model_dir import CheckpointError, atomic_dir, load_model_dir, write_json
from flexmoe.io.digests import verify as verify_digest
from flexmoe.io.stream import FilePool, LazyTensor, read_header
from flexmoe.io.writer import PartsTap, write_file
from flexmoe.flex.consent import make_consent
from flexmoe.io.fingerprint import fingerprint
from flexmoe.io.keys import (EXPERT_WEIGHTS, SHARED_PREFIX, experts_key, is_shared_key, package_bias_key, package_layer_of,
                             package_router_key, package_weight_key, router_bias_key, router_weight_key, storage_order)
from flexmoe.io.schema import (DP, DP_FIELDS, PACKAGE_FORMAT, PACKAGE_MANIFEST, PROFILE_DP, Field, Record, check,
                               read_record, reserved_rule, sha256_rule)

if TYPE_CHECKING:  # a merge opens packages without importing torch
    import torch

FORMAT = PACKAGE_FORMAT
SHARED_TRAINING_STAGES = ("sft", "rl_unfrozen")
TENSORS = "expert.safetensors"
MANIFEST = "manifest.json"
# Weights cross organisations in these dtypes only (what training writes and export-hf casts to);
# anything else would be promoted or refused deep inside merge, or break the merged model.
ALLOWED_DTYPES = ("float32", "bfloat16", "float16")

# Owner-fitted top-k router rows (optional): one `[d_model]` row per layer, fitted by the owner on
# its own data against the public row (recipes/owner_router.py), and the fit's record.
FITTED_ROUTER = "fitted_router"
FITTED_TARGETS = ("pair", "doc", "own")
FITTED_ROUTER_RECORD = Record({
    "target": Field((str,), choices=FITTED_TARGETS),
    "anchor_only_weight": Field((float,), rule=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
    "own_weight": Field((float,), required=False, rule=lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
    "own_windows": Field((int,), rule=lambda v: None if v > 0 else "must be positive"),
    "public_windows": Field((int,), rule=lambda v: None if v >= 0 else "must be >= 0"),
    "seq_len": Field((int,), rule=lambda v: None if v > 0 else "must be positive"),
    "steps": Field((int,), rule=lambda v: None if v > 0 else "must be positive"),
    "lr": Field((float,)),
    "tokens": Field((int,), rule=lambda v: None if v > 0 else "must be positive"),
    "public_row_sha256": Field((str,), rule=sha256_rule),  # the public rows it was fitted against
    "layers": Field((list,), required=False, items=Field((str,))),
    "seconds": Field((float,), required=False),
})
MANIFEST_SPEC = Record({**PACKAGE_MANIFEST.fields,
                        FITTED_ROUTER: Field((dict,), required=False, record=FITTED_ROUTER_RECORD)})


def fitted_router_key(layer: int) -> str:
    """The owner-fitted top-k router row of `layer` in a package (optional)."""
    return f"{FITTED_ROUTER}.{layer}"


def make_package(trained_dir: str | Path, out_dir: str | Path, *, owner: str, domain: str,
                 licence: str = "unspecified", dp: dict[str, Any] | None = None,
                 include_shared: bool | None = None, allowed_uses: list[str] | None = None,
                 expires: str | None = None, overwrite: bool = False,
                 fitted_router: tuple[list[torch.Tensor], dict[str, Any]] | None = None) -> Path:
    """Cut the owner's expert (slot 1) out of a trained 2-expert anchor model.

    `fitted_router`: (one `[d_model]` row per layer, the fit's record), from
    recipes/owner_router.fit_package_rows: shipped as `fitted_router.{i}` and manifest `fitted_router`.

    `allowed_uses` (see flex.consent.USES) and `expires` (YYYY-MM-DD, last valid day) form the
    manifest's `consent` record, which merge carries into the merged model; without uses, no
    `use=` request will activate this expert.

    Stages that unfreeze shared parameters (BAR's `sft`, `rl_unfrozen`) also ship those tensors
    (`shared.<name>`), for `flexmoe merge --shared average`; `include_shared` defaults to that.
    """
    trained_dir = Path(trained_dir)
    consent = make_consent(allowed_uses, expires, where="package --allowed-uses/--expires")
    for flag, name in (("--owner", owner), ("--domain", domain)):
        why = reserved_rule(name) if isinstance(name, str) else "must be a string"
        if why:
            raise CheckpointError(f"package {flag} {why}")
    cfg, sd, meta = load_model_dir(trained_dir)
    if cfg.num_experts != 2:
        raise CheckpointError(f"{trained_dir}: expected a 2-expert anchor model, found num_experts={cfg.num_experts}")
    base_fp = meta.get("base_fingerprint")
    if not base_fp:
        raise CheckpointError(f"{trained_dir / 'flexmoe.json'}: no base_fingerprint; was it made by `flexmoe branch`?")
    stage = meta.get("stage")
    if include_shared is None:
        include_shared = stage in SHARED_TRAINING_STAGES
    if not include_shared and fingerprint(sd) != base_fp:
        raise CheckpointError(f"{trained_dir}: shared tensors or the anchor differ from the public model "
                              "(fingerprint mismatch); only anchor-frozen training can be packaged "
                              "(BAR stages sft/rl_unfrozen ship their shared tensors)")
    tensors: dict[str, torch.Tensor] = {}
    if include_shared:
        for k, v in sd.items():
            if is_shared_key(k) and k not in NATIVE_BUFFERS:
                tensors[f"{SHARED_PREFIX}{k}"] = v.contiguous()
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            tensors[package_weight_key(i, name)] = sd[experts_key(i, name)][1].contiguous()
        tensors[package_router_key(i)] = sd[router_weight_key(i)][1].contiguous()
        bias = sd.get(router_bias_key(i))
        if bias is not None:
            tensors[package_bias_key(i)] = bias[1:2].clamp(max=0).contiguous()
    if "domain_centroids" in sd:  # the owner's layer-0 embedding, for document routing
        tensors["domain_embedding"] = sd["domain_centroids"][1].float().contiguous()
    if "domain_ngrams" in sd:  # the owner's n-gram profile, for routing=anchor_ngram
        tensors["domain_ngram"] = sd["domain_ngrams"][1].float().contiguous()
    if fitted_router is not None:
        rows, record = fitted_router
        if len(rows) != cfg.num_layers:
            raise CheckpointError(f"fitted router rows: {len(rows)} rows for {cfg.num_layers} layers")
        for i, row in enumerate(rows):
            tensors[fitted_router_key(i)] = row.detach().float().reshape(-1).contiguous()
            check_package_value(trained_dir, fitted_router_key(i), tensors[fitted_router_key(i)])
        check(record, FITTED_ROUTER_RECORD, f"{trained_dir}: fitted router record")
    with FilePool() as pool, atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # In storage order: merge then reads the file front to back, verifying it as it copies. Recorded
        # by parts, one per tensor (io.digests): a merge copies each expert tensor into a slot of the
        # merged model and takes its verified digest instead of hashing the bytes again.
        digest = write_file(tmp / TENSORS, {k: tensors[k] for k in storage_order(tensors, moe=True)}, pool,
                            taps=(PartsTap(()),))
        manifest = {
            "format": FORMAT, "owner": owner, "domain": domain, "licence": licence,
            "base_fingerprint": base_fp, "tokens_seen": int(meta.get("tokens_seen", 0)),
            "dp": check_dp_record(dp if dp is not None else meta.get("dp"), trained_dir), "consent": consent,
            **profile_budget(meta, dp if dp is not None else meta.get("dp"), trained_dir),
            "shape": {"num_layers": cfg.num_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff},
            "router_bias": cfg.router_bias, "stage": stage,
            "shared": sorted(k[len("shared."):] for k in tensors if k.startswith("shared.")),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {TENSORS: digest},
            **({FITTED_ROUTER: fitted_router[1]} if fitted_router is not None else {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return Path(out_dir)


def read_package(pkg_dir: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a package, everything checked before a tensor is used.

    The manifest fits its schema (types, format version, names, consent); the directory holds
    exactly the files it lists, each a plain file (no link, nothing outside); with `verify` every
    file's sha256 matches; the tensors are the ones the manifest's shape implies, in an allowed
    dtype, finite. Nothing is unpickled: safetensors only."""
    manifest, lazy = open_package(pkg_dir, verify)
    with FilePool() as pool:
        tensors = {k: pool.read(t) for k, t in lazy.items()}
    check_package_tensors(Path(pkg_dir) / TENSORS, manifest, tensors)
    return manifest, tensors


def open_package(pkg_dir: str | Path, verify: bool = True, defer: FilePool | None = None
                 ) -> tuple[dict[str, Any], dict[str, LazyTensor]]:
    """Manifest and lazy tensors of a package: `read_package`'s checks except the tensors' values
    (check those with `check_package_tensors`, or as they stream). With `defer` (the pool the
    caller's pass reads through), the sha256 of the tensors file is checked by that pass; a
    refusal met before then names the sha256 mismatch first when there is one."""
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise CheckpointError(f"{pkg_dir}: not a directory (expected an expert package)")
    manifest = read_record(pkg_dir / MANIFEST, MANIFEST_SPEC)
    files = manifest["files"]
    if TENSORS not in files:
        raise CheckpointError(f"{pkg_dir / MANIFEST}: field 'files' does not list {TENSORS}, so nothing proves it unchanged")
    for entry in sorted(pkg_dir.iterdir()):
        if entry.name != MANIFEST and entry.name not in files:
            raise CheckpointError(f"{entry}: not listed in {pkg_dir / MANIFEST}; a package holds only the files it lists")
    for name, digest in files.items():
        f = pkg_dir / name
        if "/" in name or name == MANIFEST or f.is_symlink() or (f.exists() and not f.is_file()):
            raise CheckpointError(f"{pkg_dir / MANIFEST}: field 'files' lists {name!r}, which is not a plain file "
                                  "of the package directory")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if verify and defer is not None:
            defer.expect(f, digest, pkg_dir / MANIFEST)
        elif verify:
            verify_digest(f, digest, pkg_dir / MANIFEST)
    try:
        tensors, _ = read_header(pkg_dir / TENSORS)
        check_package_tensors(pkg_dir / TENSORS, manifest, tensors)
    except CheckpointError as e:
        if defer is None:
            raise
        raise defer.blame(e, [pkg_dir / TENSORS])
    return manifest, tensors


def check_package_tensors(where: Path, manifest: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The tensors of one expert (a package's, or an HF anchor's slot 1) are exactly what its
    manifest's shape implies, each in an allowed dtype and finite; a router bias is `[1]` and <= 0.
    Lazy tensors (io.stream.LazyTensor) get every check but the values'."""
    shape = manifest["shape"]
    L, D, F = shape["num_layers"], shape["d_model"], shape["d_ff"]
    want: dict[str, tuple[int, ...] | None] = {}
    for i in range(L):
        want.update({package_weight_key(i, "gate_proj"): (F, D), package_weight_key(i, "up_proj"): (F, D),
                     package_weight_key(i, "down_proj"): (D, F), package_router_key(i): (D,)})
    optional = {"domain_embedding": (D,), "domain_ngram": None}
    optional.update({package_bias_key(i): (1,) for i in range(L)})
    optional.update({f"shared.{k}": None for k in manifest.get("shared") or []})
    fitted = [fitted_router_key(i) for i in range(L)]
    optional.update({k: (D,) for k in fitted})
    have = [k for k in fitted if k in tensors]
    if have and len(have) != L:
        missing = next(k for k in fitted if k not in tensors)
        raise CheckpointError(f"{where}: fitted router rows for {len(have)} of {L} layers (no {missing}); "
                              "re-run `flexmoe package --fit-router`")
    if bool(have) != (manifest.get(FITTED_ROUTER) is not None):
        raise CheckpointError(f"{where}: " + ("fitted router rows without a 'fitted_router' record in the manifest"
                                              if have else "the manifest records 'fitted_router' but the file "
                                              f"has no {fitted[0]}") + "; re-run `flexmoe package --fit-router`")
    for key in want:
        if key not in tensors:
            raise CheckpointError(f"{where}: missing tensor {key}, which {manifest.get('shape')} in the manifest implies")
    for key, t in tensors.items():
        if key not in want and key not in optional:
            raise CheckpointError(f"{where}: unexpected tensor {key!r} for the expert its manifest describes")
        expected = want.get(key, optional.get(key))
        if expected is not None and tuple(t.shape) != expected:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, its manifest implies {expected}")
        if expected is None and (len(t.shape) != 1 if key == "domain_ngram" else len(t.shape) == 0):
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}; not a tensor of its kind")
        dtype = text(t) if isinstance(t, LazyTensor) else str(t.dtype)  # in memory: torch's or numpy's
        if dtype.removeprefix("torch.") not in ALLOWED_DTYPES:
            raise CheckpointError(f"{where}: {key} is {dtype.removeprefix('torch.')}; package tensors must be "
                                  "float32, bfloat16 or float16")
        if not isinstance(t, LazyTensor):
            check_package_value(where, key, t)


def check_package_value(where: Path, key: str, t) -> None:
    """One package tensor's values (a torch tensor or a numpy array): finite, and a router bias <= 0."""
    import numpy as np

    if isinstance(t, np.ndarray):
        finite = bool(np.isfinite(t).all())
    else:
        import torch

        finite = bool(torch.isfinite(t).all())
    if not finite:
        raise CheckpointError(f"{where}: {key} holds NaN or Inf values; the expert is broken, do not merge it")
    layer = package_layer_of(key)
    if layer is not None and key == package_bias_key(layer) and bool((t > 0).any()):
        raise CheckpointError(f"{where}: {key} is positive; a router bias may only lower an expert's score "
                              "(packages clamp it to <= 0)")


def profile_budget(meta: dict[str, Any], dp: dict[str, Any] | None, where: Path) -> dict[str, Any]:
    """`profile_dp` (the DP budget of the owner's n-gram profile, from `router-embed --dp-epsilon`
    through branch and training) and `privacy_total` (basic composition with the training's `dp`),
    for the manifest; empty for an exact profile."""
    from flexmoe.data.private_ngrams import total_budget

    profile_dp = (meta.get("router_embedding") or {}).get("profile_dp")
    if profile_dp is None:
        return {}
    return {"profile_dp": check(profile_dp, PROFILE_DP, where),
            "privacy_total": total_budget(dp, profile_dp)}


def check_dp_record(dp: dict[str, Any] | None, where: Path) -> dict[str, Any] | None:
    """A DP claim in a manifest must state its whole guarantee (see train/privacy.py), or be absent."""
    if dp is None:
        return None
    missing = [f for f in DP_FIELDS if not isinstance(dp.get(f), (int, float)) or isinstance(dp.get(f), bool)]
    if missing:
        raise CheckpointError(f"{where}: dp record lacks numeric {missing}; train with privacy.enabled=true or drop the dp claim")
    return check(dp, DP, where)
