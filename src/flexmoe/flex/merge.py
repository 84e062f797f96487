"""Merge: the public model + any N expert packages -> one (N+1)-expert MoE, streamed.

Inputs may also be Hugging Face directories: 2-expert FlexOlmo checkpoints as experts and a dense
Olmo2 as the public model (flex/hf_inputs.py). For a Hugging Face output, run `flexmoe export-hf`.

Every output tensor is built from byte spans of its inputs: expert slot 0 from the public model's
dense FFN, slot j from package j, router rows stacked (and transformed) in memory, shared tensors
copied from the public model or averaged chunk by chunk, written shard by shard (`max_shard_size`):
memory stays at a few read chunks plus the router rows, whatever the number of experts or the model
size. Bytes copied from a verified part of a parts-recorded input are recorded by its digest (io.digests).

Checked before writing: the public model's fingerprint, every manifest, file listing, tensor name,
shape, dtype and small tensor, fingerprints, duplicate domains, and every input's digests (under
`flexmoe merge` child processes hash them while this one imports torch: io.prehash; a library call
hashes them itself), so the pass copies verified bytes; a NaN found as it copies discards the
output before it is renamed into place. A refusal is one line naming the file at fault (the digest
mismatch first when a file's bytes are not its manifest's), and leaves no output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flexmoe.config.model import ROUTINGS
from flexmoe.io import prehash
from flexmoe.io.digests import entry_sha256
from flexmoe.io.dtypes import nbytes
from flexmoe.io.hf_dir import hf_architecture
from flexmoe.io.model_dir import META, CheckpointError, atomic_dir, refuse_overlap
from flexmoe.io.native import open_native, parse_size, write_native
from flexmoe.io.progress import Progress
from flexmoe.io.stream import CHUNK, FilePool, LazyTensor, stream_fingerprint
from flexmoe.io.writer import FiniteTap, Generated, stacked
from flexmoe.flex.consent import PUBLIC_CONSENT
from flexmoe.flex.merge_router import (ROW_TRANSFORMS, float32_of, ngram_profiles, public_router_file, public_rows,
                                       transform_rows)
from flexmoe.io.schema import reserved_rule
from flexmoe.flex.package import TENSORS, check_package_tensors, check_package_value, open_package
from flexmoe.io.keys import (EXPERT_WEIGHTS, SHARED_PREFIX, dense_ffn_key, experts_key, is_shared_key, package_bias_key,
                             package_layer_of, package_router_key, package_weight_key, router_bias_key,
                             router_weight_key)
from flexmoe.io.log import get_logger

log = get_logger(__name__)


def merge(public_dir: str | Path, packages: list[str | Path], out_dir: str | Path, *, top_k: int | None = None,
          norm_topk_prob: bool = False, routing: str = "auto", shared: str = "public",
          router_rows: str = "raw", router_cosine_temp: float = 0.0, overwrite: bool = False,
          verify: bool = True, max_shard_size: int | str | None = None,
          router_override: dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write the merged model; expert slot 0 is the public FFN, slot j the j-th package.

    `shared`: `public` keeps the public model's shared tensors (FlexOlmo); `average` takes the mean
    over the packages' copies (BAR), a package without trained shared tensors counting the public
    copy. Either way the relative L2 divergence of every shipped shared tensor is recorded.
    `routing`: a policy of ModelConfig.routing, or `auto`: anchor_ngram when the public model and
    every package carry n-gram profiles (the measured best, README "Routing quality"), else topk.
    `router_cosine_temp` > 0: the router scores rows by cosine similarity over that temperature.
    `verify` False skips the inputs' sha256 checks (the caller verified them); schemas, shapes,
    dtypes and finiteness are checked either way. `max_shard_size` (bytes or '5GB'): write the
    weights as shards of at most that size with an index (default: one model.safetensors).
    `router_override` / `extra_meta`: router tensors instead of the stacked rows, flexmoe.json fields.
    """
    if routing != "auto" and routing not in ROUTINGS:
        raise CheckpointError(f"routing={routing!r} is not auto|{'|'.join(ROUTINGS)}")
    if router_cosine_temp < 0:
        raise CheckpointError(f"router_cosine_temp={router_cosine_temp} must be >= 0 (0: dot-product routing)")
    if shared not in ("public", "average"):
        raise CheckpointError(f"shared={shared!r} is not public|average")
    if router_rows not in ROW_TRANSFORMS:
        raise CheckpointError(f"router_rows={router_rows!r} is not one of {'|'.join(ROW_TRANSFORMS)}")
    shard_limit = parse_size(max_shard_size)
    public_dir = Path(public_dir)
    if not packages:
        raise CheckpointError("merge needs at least one expert package")
    refuse_overlap(out_dir, [public_dir, *packages], "--out")
    if not overwrite and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; give --out a new or empty directory")
    with FilePool() as pool:
        cfg, sd, meta, fp = _open_public(public_dir, verify, pool)
        loaded: list[tuple[Path, dict[str, Any], dict[str, Any]]] = []
        small: list[dict[str, np.ndarray]] = []  # per package: router rows, biases, routing tensors (float32)
        seen: dict[str, Path] = {}
        for pkg in map(Path, packages):
            hf = not (pkg / "manifest.json").exists() and hf_architecture(pkg)
            if hf:
                from flexmoe.flex.hf_inputs import read_hf_anchor

                # A Hugging Face 2-expert FlexOlmo checkpoint: slot 1 is the owner's expert, once
                # slot 0 and every shared tensor are proven to be this public model's.
                manifest, tensors = read_hf_anchor(pkg, fp, public_sd=sd, verify=verify)
                check_package_tensors(pkg, manifest, tensors)
            else:
                manifest, tensors = open_package(pkg, verify, defer=pool)
            where = pkg if hf else pkg / TENSORS
            try:
                if manifest["base_fingerprint"] != fp:
                    raise CheckpointError(f"{pkg / 'manifest.json'}: base fingerprint {manifest['base_fingerprint'][:12]}"
                                          f"... is not the public model's {fp[:12]}...; it was trained from another model")
                _check_names(pkg, manifest, loaded, seen)
                seen[manifest["domain"]] = pkg
                _check_shapes(pkg, tensors, cfg)
                small.append(_small_tensors(where, tensors, pool))
            except CheckpointError as e:
                raise pool.blame(e, [pkg / TENSORS])
            loaded.append((pkg, manifest, tensors))
        try:
            return _write(public_dir, out_dir, pool, cfg, sd, meta, fp, loaded, small, top_k=top_k,
                          norm_topk_prob=norm_topk_prob, routing=routing, shared=shared, router_rows=router_rows,
                          router_cosine_temp=router_cosine_temp, overwrite=overwrite, shard_limit=shard_limit,
                          router_override=router_override or {}, extra_meta=extra_meta or {})
        except CheckpointError as e:
            err = pool.blame(e)
            if err is e:
                raise
            raise err from e


def _open_public(public_dir: Path, verify: bool, pool: FilePool):
    """(cfg, lazy tensors, meta, fingerprint) of the public model, verified before anything is written:
    its files' sha256s and its fingerprint in one pass over its weights."""
    if hf_architecture(public_dir):  # a dense Hugging Face Olmo2 directory may stand in for it
        from flexmoe.flex.hf_inputs import read_hf_public

        cfg, sd, meta = read_hf_public(public_dir)
        checked = True  # its fingerprint was just computed from its tensors
    else:
        cfg, sd, meta = open_native(public_dir, verify, defer=pool)
        checked = False
    try:
        if cfg.is_moe:
            raise CheckpointError(f"{public_dir}: merge takes the dense public model, found num_experts={cfg.num_experts}")
        fp = meta.get("fingerprint")
        if not fp:  # without it a corrupted public model would be blamed on every package
            raise CheckpointError(f"{public_dir / META}: has no fingerprint; merge takes a public model written by "
                                  "`flexmoe train` (or import-hf)")
        if not checked:  # computed by a child process (io.prehash) when `flexmoe merge` started one
            got = (verify and prehash.known_fingerprint(sd)) or stream_fingerprint(sd, pool)
            pool.check_expected()
            if got != fp:
                raise CheckpointError(f"{public_dir}: tensors do not match the fingerprint in its flexmoe.json")
    except CheckpointError as e:
        raise pool.blame(e)
    return cfg, sd, meta, fp


def _small_tensors(where: Path, tensors: dict[str, Any], pool: FilePool) -> dict[str, np.ndarray]:
    """A package's router rows, biases and routing tensors, read into memory as float32 (all merge does
    with them is stack them: numpy, no torch import on a merge's path) with their values checked
    (the weights and shared copies are checked as they stream)."""
    out = {}
    for key, t in tensors.items():
        if package_layer_of(key) is not None and key not in (package_router_key(package_layer_of(key)),
                                                             package_bias_key(package_layer_of(key))):
            continue
        if key.startswith(SHARED_PREFIX):
            continue
        out[key] = float32_of(t, pool)
        check_package_value(where, key, out[key])
    return out


def _write(public_dir, out_dir, pool, cfg, sd, meta, fp, loaded, small, *, top_k, norm_topk_prob, routing, shared,
           router_rows, router_cosine_temp, overwrite, shard_limit, router_override, extra_meta) -> Path:
    num_experts = len(loaded) + 1
    k = top_k if top_k is not None else min(2, num_experts)
    if not 1 <= k <= num_experts:
        raise CheckpointError(f"top_k={k} must be between 1 and the number of experts ({num_experts})")
    use_bias = any(m.get("router_bias") for _, m, _ in loaded) or any(k.endswith("router.bias") for k in router_override)
    public_file, shipped = public_router_file(public_dir, meta)
    rows_LD = public_rows(public_dir, shipped, cfg)
    out: dict[str, Any] = {k_: v for k_, v in sd.items() if is_shared_key(k_)}
    finite: dict[str, dict[int, tuple[Path, str]]] = {}
    divergence: dict[str, dict[str, float]] = {}  # filled in as the pass streams the shared tensors
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            key = experts_key(i, name)
            out[key] = stacked([sd[dense_ffn_key(i, name)]] + [t[package_weight_key(i, name)] for _, _, t in loaded])
            finite[key] = {j: (pkg if not (pkg / "manifest.json").exists() else pkg / TENSORS,
                               package_weight_key(i, name)) for j, (pkg, _, _) in enumerate(loaded, start=1)}
        rows = np.stack([rows_LD[i]] + [s[package_router_key(i)] for s in small])
        out[router_weight_key(i)] = transform_rows(router_rows, rows)
        if use_bias:
            out[router_bias_key(i)] = np.concatenate(
                [np.zeros(1, np.float32)] + [s.get(package_bias_key(i), np.zeros(1, np.float32)) for s in small])
    for key, t in router_override.items():  # calibrated router tensors (flex/calibrate.py)
        if key not in out or tuple(out[key].shape) != tuple(t.shape):
            raise CheckpointError(f"router override {key} {tuple(t.shape)} does not fit the merged model")
        out[key] = t.float().contiguous()
    notes = []  # said once the output is in place: a refusal stays the only line on stderr
    if _shared_streams(out, sd, loaded, average=shared == "average", pool=pool, divergence=divergence) \
            and shared == "public":
        notes.append("packages carry trained shared tensors; keeping the public copies (shared=public)")
    # Document routing's centroids: the public row and each owner's embedding at layer 0.
    out["domain_centroids"] = np.stack(
        [rows_LD[0]] + [s.get("domain_embedding", np.zeros(cfg.d_model, np.float32)) for s in small])
    profiles = ngram_profiles(public_file, shipped, loaded, small, required=routing == "anchor_ngram")
    if routing == "auto":
        routing = "anchor_ngram" if profiles is not None else "topk"
        notes.append(f"merge: routing={routing}" + ("" if profiles is not None else " (not every package carries "
                     "an n-gram profile for anchor_ngram)"))
    if profiles is not None:  # n-gram profiles of document routing: public data's, then each owner's
        out["domain_ngrams"] = profiles
    merged_cfg = cfg.replace(num_experts=num_experts, top_k=k, norm_topk_prob=norm_topk_prob, router_bias=use_bias,
                             routing=routing, router_cosine_temp=router_cosine_temp,
                             doc_ngram_buckets=int(profiles.shape[-1]) if profiles is not None else 0)
    experts = [{"slot": 0, "owner": "public", "domain": "public", "licence": meta.get("licence", "unspecified"),
                "consent": meta.get("consent") or PUBLIC_CONSENT}]
    for j, (pkg, m, _) in enumerate(loaded, start=1):
        experts.append({"slot": j, "owner": m["owner"], "domain": m["domain"], "licence": m.get("licence"),
                        "package_sha256": entry_sha256(m["files"].get(TENSORS)), "tokens_seen": m.get("tokens_seen"),
                        "dp": m.get("dp"), "consent": m.get("consent"), "source": str(pkg),
                        **{k: m[k] for k in ("profile_dp", "privacy_total") if k in m}})  # a DP n-gram profile
    new_meta = {"kind": "merged", "base_fingerprint": fp, "tokenizer": meta.get("tokenizer"), "experts": experts,
                "shared": shared, **extra_meta}
    pool.check_expected()  # every input's digests (children's or hashed here): refused before any output byte
    checked = prehash.finite_checked({w[0] for slots in finite.values() for w in slots.values()})  # and values
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        progress = Progress(f"merge {len(loaded)} packages", sum(nbytes(t) for t in out.values()))
        write_native(tmp, merged_cfg, out, new_meta, pool, progress, max_shard_size=shard_limit, bind_experts=True,
                     taps=(FiniteTap(finite, checked),), finish=lambda m: dict(m, shared_divergence=divergence))
        progress.finish(None)  # the log line below says what was written
    for note in notes:
        log.info(note)
    log.info(f"merged {len(loaded)} packages into {out_dir} ({num_experts} experts, top_k={k})")
    for e in experts[1:]:
        log.info(privacy_line(e))
    return Path(out_dir)


def privacy_line(expert: dict[str, Any]) -> str:
    """One line on what protects an expert's owner: its DP-SGD record, a DP n-gram profile's budget
    and their total, or that it carries no guarantee."""
    who = f"slot {expert['slot']} {expert['owner']}/{expert['domain']}"
    dp, prof = expert.get("dp"), expert.get("profile_dp")
    parts = []
    if dp:
        parts.append(f"DP-SGD epsilon {dp['epsilon']:.3g} at delta {dp['delta']:g} (unit {dp.get('unit', 'window')}, "
                     f"{dp.get('accountant', '?')} accountant, sigma {dp['noise_multiplier']:.3g}, q "
                     f"{dp['sampling_rate']:.3g}, {dp['steps']} steps)")
    if prof:
        parts.append(f"n-gram profile epsilon {prof['epsilon']:.3g} ({prof['mechanism']}, unit {prof['unit']})")
    total = expert.get("privacy_total")
    if prof and total:
        parts.append(f"total epsilon {total['epsilon']:.3g} at delta {total['delta']:g} ({total['composition']})")
    if not parts:
        return f"privacy: {who}: no differential-privacy guarantee (trained without DP-SGD, no DP profile)"
    return f"privacy: {who}: " + "; ".join(parts)


def _shared_streams(out: dict[str, Any], public_sd: dict[str, Any], loaded, *, average: bool,
                    pool: FilePool, divergence: dict[str, dict[str, float]]) -> list[str]:
    """Shared tensors packages ship: each output tensor becomes a stream over its copies, chunk by chunk
    (the public copy, or with `average` the mean over the packages' copies, a package without one
    counting the public copy), which also measures each owner's relative L2 divergence from the
    public copy into `divergence` ({name: {owner: value}}) as the pass writes it. Returns the names."""
    names: dict[str, None] = {}
    for pkg, _, tensors in loaded:
        for key, t in tensors.items():
            if not key.startswith(SHARED_PREFIX):
                continue
            name = key[len(SHARED_PREFIX):]
            ref = public_sd.get(name)
            if ref is None or tuple(ref.shape) != tuple(t.shape):
                raise CheckpointError(f"{pkg / TENSORS}: shared tensor {name} does not fit the public model")
            names[name] = None
    for name in names:
        copies = [(pkg, m["owner"], t.get(SHARED_PREFIX + name)) for pkg, m, t in loaded]
        out[name] = Generated(public_sd[name].dtype, tuple(public_sd[name].shape),
                              _shared_chunks(name, public_sd[name], copies, average, pool, divergence))
    return list(names)


def _shared_chunks(name, ref_t, copies, average: bool, pool: FilePool, divergence):
    def read(t, lo, hi):
        return pool.read(t.flat(lo, hi)) if isinstance(t, LazyTensor) else t.reshape(-1)[lo:hi]

    import torch  # only packages that ship shared tensors bring torch into a merge

    def make():
        n, step = math.prod(ref_t.shape), max(CHUNK // 4, 1)
        ref2, diff2 = 0.0, {}
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ref = read(ref_t, lo, hi)
            parts = []
            for pkg, owner, t in copies:
                if t is None:
                    parts.append(ref)
                    continue
                c = read(t, lo, hi)
                check_package_value(pkg / TENSORS, SHARED_PREFIX + name, c)
                diff2[owner] = diff2.get(owner, 0.0) + float((c.double() - ref.double()).square().sum())
                parts.append(c)
            ref2 += float(ref.double().square().sum())
            # The same reduction as torch.stack(copies).mean(0) on the whole tensor, one chunk at a time.
            yield torch.stack([p.float() for p in parts]).mean(0).to(ref.dtype) if average else ref
        divergence[name] = {o: math.sqrt(d) / max(math.sqrt(ref2), 1e-12) for o, d in diff2.items()}
    return make


def _check_names(pkg: Path, manifest: dict[str, Any], loaded, seen: dict[str, Path]) -> None:
    """Every domain names exactly one expert: not `public` (slot 0), not another input's domain or
    owner, so opt-out and remove-expert can always name it."""
    owner, domain = manifest["owner"], manifest["domain"]
    for what, name in (("owner", owner), ("domain", domain)):
        why = reserved_rule(name)
        if why:  # `public` could never be opted out or removed
            raise CheckpointError(f"{pkg}: {what} {why}")
    if domain in seen:
        raise CheckpointError(f"{pkg}: domain {domain!r} is already given by {seen[domain]}")
    for other, m, _ in loaded:
        clash = domain if domain == m["owner"] else owner if owner == m["domain"] else None
        if clash is not None:
            raise CheckpointError(f"{pkg}: name {clash!r} is also a name of the expert in {other}; "
                                  "every domain must name exactly one expert")


def _check_shapes(pkg: Path, tensors: dict[str, Any], cfg) -> None:
    want = {"gate_proj": (cfg.d_ff, cfg.d_model), "up_proj": (cfg.d_ff, cfg.d_model),
            "down_proj": (cfg.d_model, cfg.d_ff)}
    for i in range(cfg.num_layers):
        for key, shape in [(package_weight_key(i, n), s) for n, s in want.items()] + [(package_router_key(i), (cfg.d_model,))]:
            t = tensors.get(key)
            if t is None:
                raise CheckpointError(f"{pkg / 'expert.safetensors'}: missing tensor {key}")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{pkg / 'expert.safetensors'}: {key} has shape {tuple(t.shape)}, "
                                      f"the public model needs {shape}")
    emb = tensors.get("domain_embedding")
    if emb is not None and tuple(emb.shape) != (cfg.d_model,):
        raise CheckpointError(f"{pkg / 'expert.safetensors'}: domain_embedding has shape {tuple(emb.shape)}, "
                              f"the public model needs ({cfg.d_model},)")
    extra = [k for k in tensors if (package_layer_of(k) or 0) >= cfg.num_layers]
    if extra:
        raise CheckpointError(f"{pkg / 'expert.safetensors'}: has tensors for layers the public model lacks ({extra[0]})")
