"""Owner-fitted top-k router rows: each owner fits its own row on its own data, ships it, and the
merge stacks the shipped rows (`flexmoe package --fit-router`, `merge --routing topk --calibrate owner`).

The pooled calibration that did best on the quickstart (docs/routing.md, "Calibrated top-k")
fitted every router row on public text plus every owner's own data in one place, which a default
may not do. Here owner j does its part alone, with what it already has: the public model's anchor
(slot 0, with the public router row, held fixed), its own trained expert (slot 1) and its data,
plus public text. Per layer it fits its row so that the 2-way softmax public-vs-own of its
2-expert model under top-k reproduces a document-routing target:

    target `pair` (default): own-data tokens -> the anchor + own expert (the document router's
    pair weights); public tokens -> the document router over the public and own n-gram profiles
    (mostly the anchor alone). target `doc`: that document router on every token. target `own`:
    as `pair`, but own-data tokens -> weight `own_weight` on the own expert, the rest on the anchor.

Tokens the target gives to the anchor alone weigh `anchor_only_weight` (default 0.1: missing the
owner's expert on its own text costs more than mixing it into public text). Layers are fitted in
order on the states of the model whose earlier rows are already fitted (recipes/calibrate.py's
fit). Every owner fits against the same public row, so the merged softmax compares like with like.

The rows go into the package as `fitted_router.{i}` with a `fitted_router` record in the manifest
(flex/package.py checks both on every read; the record names the public rows fitted against by
sha256); nothing about the data leaves but one row per layer, as with the package's trained rows.
The merge uses the public row as is and each package's fitted rows in its slot (refusing rows
fitted against another public row); everything else is the plain top-k merge.

Measured (docs/routing.md, "Calibrated top-k"): never worse than the uncalibrated top-k on the
quickstart and on ../shared/corpora, better on most domains by 2-11%, but the opt-out drift stays
at 17-21% and the worst domain above 1.25x its expert: an experiment, not a default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexmoe.io.keys import router_weight_key

OWNER_CALIBRATION = "owner"
"""`merge --routing topk --calibrate owner`: stack the rows each package's owner fitted."""


@dataclass
class OwnerFitConfig:
    """What an owner fits its rows on (`flexmoe package --fit-router DIR ...`)."""

    own_data: str  # the owner's prepared token directory (prepare-data)
    public_data: str | None = None  # prepared public tokens (recommended: without them nothing says "not mine")
    own_windows: int = 32
    public_windows: int = 32
    seq_len: int = 256
    steps: int = 300
    lr: float = 0.05
    anchor_only_weight: float = 0.1
    target: str = "pair"
    own_weight: float = 0.9  # target `own` only

    def validate(self) -> None:
        """Refuse settings that cannot fit, naming the setting."""
        from flexmoe.flex.package import FITTED_TARGETS

        if self.target not in FITTED_TARGETS:
            raise ValueError(f"--fit-router-target {self.target!r} is not one of {'|'.join(FITTED_TARGETS)}")
        for name in ("own_windows", "seq_len", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--fit-router {name}={getattr(self, name)} must be positive")
        if self.public_windows < 0:
            raise ValueError(f"--fit-router-public-windows {self.public_windows} must be >= 0")
        if not 0 < self.own_weight < 1:
            raise ValueError(f"--fit-router-own-weight {self.own_weight} must be in (0, 1)")
        if not 0 <= self.anchor_only_weight <= 1:
            raise ValueError(f"--fit-router-a0 {self.anchor_only_weight} must be in [0, 1]")
        if self.lr <= 0:
            raise ValueError(f"--fit-router lr {self.lr} must be > 0")
        for flag, d in (("--fit-router", self.own_data), ("--fit-router-public", self.public_data)):
            if d is not None and not (Path(d) / "manifest.json").is_file():
                raise ValueError(f"{flag} {d}: not a prepared token directory (no manifest.json; make one with "
                                 "`flexmoe prepare-data`)")


def _windows(data_dir: str, num: int, seq_len: int, flag: str) -> torch.Tensor:
    from flexmoe.data import TokenWindows
    from flexmoe.recipes.calibrate import public_text

    try:
        windows = TokenWindows(data_dir, seq_len)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {data_dir}: not a prepared token directory ({e})") from e
    if len(windows) == 0:
        raise ValueError(f"{flag} {data_dir}: no window of {seq_len} tokens")
    return public_text(windows, num, seq_len)


def fit_owner_rows(model, own_NS: torch.Tensor, public_NS: torch.Tensor, *, target: str = "pair",
                   anchor_only_weight: float = 0.1, steps: int = 300, lr: float = 0.05,
                   own_weight: float = 0.9) -> list[torch.Tensor]:
    """One fitted `[D]` row per layer for slot 1 of `model` (an owner's trained 2-expert anchor
    model carrying the public and its own n-gram profile), the public row (slot 0) held fixed."""
    from flexmoe.model.docroute import ngram_choice
    from flexmoe.recipes.calibrate import calibrate_model, document_targets, with_routing

    cfg = model.cfg
    if cfg.num_experts != 2:
        raise ValueError(f"fitting an owner's row needs its 2-expert anchor model, found num_experts={cfg.num_experts}")
    if not cfg.doc_ngram_buckets:
        raise ValueError("the trained model carries no n-gram profiles, which the document-routing target needs; "
                         "run `flexmoe router-embed` (public with --public) and branch again")
    doc = with_routing(model, "anchor_ngram")
    tokens = torch.cat([own_NS, public_NS]).long()
    choice = ngram_choice(tokens, doc.domain_ngrams)
    if target in ("pair", "own"):
        choice[: len(own_NS)] = 1
    targets = None
    if target == "own":
        targets = document_targets(doc, tokens, choice_NS=choice)
        n_own = own_NS.numel()
        for t in targets:
            t[:n_own] = torch.tensor([1 - own_weight, own_weight])
    fitted = calibrate_model(doc, tokens, mode="rows", steps=steps, lr=lr, choice_NS=choice,
                             anchor_only_weight=anchor_only_weight, fit_rows=[1], targets=targets)
    return [fitted[router_weight_key(i)][1].clone() for i in range(cfg.num_layers)]


@torch.no_grad()
def routed_share(model_topk, tokens_NS: torch.Tensor, slot: int, batch_size: int = 16) -> float:
    """Share of (position, layer) pairs whose top-k experts include `slot`, over every MoE layer."""
    hit, total = 0, 0
    k = model_topk.cfg.top_k
    for start in range(0, tokens_NS.shape[0], batch_size):
        out = model_topk(tokens_NS[start:start + batch_size], capture_hidden=True, last_hidden_only=True)
        for i, layer in enumerate(model_topk.layers):
            h = out.hidden_states[i].reshape(-1, model_topk.cfg.d_model).float()
            top = torch.topk(layer.ffn.router.logits(h), k, dim=-1).indices
            hit += int((top == slot).any(-1).sum())
            total += top.shape[0]
    return hit / max(total, 1)


def fit_package_rows(trained_dir: str | Path, cfg: OwnerFitConfig,
                     log=None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """`flexmoe package --fit-router`: the owner's fitted rows and the manifest record, from its
    trained 2-expert model, its own data and (optionally) public text."""
    from flexmoe.recipes.calibrate import with_routing
    from flexmoe.train.load import load_model

    cfg.validate()
    t0 = time.perf_counter()
    model, _, _ = load_model(trained_dir)
    model.eval()
    own = _windows(cfg.own_data, cfg.own_windows, cfg.seq_len, "--fit-router")
    public = (_windows(cfg.public_data, cfg.public_windows, cfg.seq_len, "--fit-router-public")
              if cfg.public_data and cfg.public_windows else torch.zeros(0, cfg.seq_len, dtype=torch.long))
    rows = fit_owner_rows(model, own, public, target=cfg.target, anchor_only_weight=cfg.anchor_only_weight,
                          steps=cfg.steps, lr=cfg.lr, own_weight=cfg.own_weight)
    # What the fit did, as the owner can see it: the own expert's mean weight on own and public text.
    fitted = with_routing(model, "topk")
    sd = fitted.state_dict()
    for i, row in enumerate(rows):
        sd[router_weight_key(i)] = torch.stack([sd[router_weight_key(i)][0], row])
    fitted.load_state_dict(sd)
    lines = []
    for name, text in (("own", own), ("public", public)):
        if len(text):
            before, after = _own_weight(model, text), _own_weight(fitted, text)
            lines.append(f"own expert's mean top-k weight on {name} text: {before:.3f} -> {after:.3f}")
            if log is not None:
                log(f"fit-router: {lines[-1]}")
    record = {"target": cfg.target, "anchor_only_weight": float(cfg.anchor_only_weight), "own_windows": len(own),
              "public_windows": len(public), "seq_len": cfg.seq_len, "steps": cfg.steps, "lr": float(cfg.lr),
              "tokens": int(own.numel() + public.numel()), "layers": lines,
              "public_row_sha256": row_digest(torch.stack([sd[router_weight_key(i)][0] for i in range(len(rows))])),
              "seconds": round(time.perf_counter() - t0, 1),
              **({"own_weight": float(cfg.own_weight)} if cfg.target == "own" else {})}
    return rows, record


def row_digest(rows_LD: torch.Tensor) -> str:
    """sha256 of `[L, D]` router rows as float32 bytes: which public row an owner fitted against."""
    import hashlib

    return hashlib.sha256(rows_LD.detach().float().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def _own_weight(model, tokens_NS: torch.Tensor, batch_size: int = 16) -> float:
    """Slot 1's mean routing weight over positions and layers."""
    model.set_record_routing(True)
    try:
        w = []
        for start in range(0, tokens_NS.shape[0], batch_size):
            out = model(tokens_NS[start:start + batch_size], last_hidden_only=True)
            w += [float(r.probs_TE[:, 1].float().mean()) for r in out.routing]
    finally:
        model.set_record_routing(False)
    return sum(w) / max(len(w), 1)


def owner_rows(packages) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[str]]:
    """Per package, its fitted rows `[L, D]`, fit record and domain; a package without them is refused."""
    from flexmoe.flex.package import FITTED_ROUTER, MANIFEST, TENSORS, check_package_value, fitted_router_key, open_package
    from flexmoe.io.model_dir import CheckpointError
    from flexmoe.io.stream import FilePool

    rows, records, domains = [], [], []
    with FilePool() as pool:
        for pkg in map(Path, packages):
            if not (pkg / MANIFEST).exists():
                raise CheckpointError(f"{pkg}: --calibrate owner takes flexmoe packages made with `flexmoe package "
                                      "--fit-router` (a Hugging Face expert carries no fitted rows)")
            manifest, tensors = open_package(pkg, verify=False)  # merge verifies the sha256 in its pass
            if manifest.get(FITTED_ROUTER) is None:
                raise CheckpointError(f"{pkg / MANIFEST}: no fitted router rows; --calibrate owner needs every "
                                      "package made with `flexmoe package --fit-router OWN_DATA`")
            layer_rows = []
            for i in range(manifest["shape"]["num_layers"]):
                t = pool.read(tensors[fitted_router_key(i)])
                check_package_value(pkg / TENSORS, fitted_router_key(i), t)
                layer_rows.append(t.float())
            rows.append(torch.stack(layer_rows))
            records.append(manifest[FITTED_ROUTER])
            domains.append(manifest["domain"])
    return rows, records, domains


def owner_rows_merge(public_dir, packages, out_dir, **merge_kw) -> Path:
    """`merge --routing topk --calibrate owner`: the top-k merge with the public row as is in slot
    0 and each package's fitted rows in its slot; `calibration` in flexmoe.json records the fits.
    `merge_kw`: flex.merge.merge's keyword arguments (routing is topk)."""
    from flexmoe.flex.merge import merge
    from flexmoe.flex.merge_router import public_router_file, public_rows
    from flexmoe.io.hf_dir import hf_architecture
    from flexmoe.io.model_dir import CheckpointError
    from flexmoe.io.native import open_native

    public_dir = Path(public_dir)
    rows, records, domains = owner_rows(packages)
    if hf_architecture(public_dir):
        raise CheckpointError(f"{public_dir}: --calibrate owner needs the native public model (its shipped router row)")
    cfg, _, meta = open_native(public_dir, verify=False)
    if merge_kw.get("router_rows", "raw") != "raw":
        raise CheckpointError("--calibrate owner stacks rows fitted against the raw public row; use --router-rows raw")
    public = torch.from_numpy(public_rows(public_dir, public_router_file(public_dir, meta)[1], cfg))
    digest = row_digest(public)
    for pkg, r, rec in zip(packages, rows, records):
        if tuple(r.shape) != (cfg.num_layers, cfg.d_model):
            raise CheckpointError(f"{pkg}: fitted rows {tuple(r.shape)} do not fit the public model "
                                  f"({cfg.num_layers}, {cfg.d_model})")
        if rec["public_row_sha256"] != digest:
            raise CheckpointError(f"{Path(pkg) / 'manifest.json'}: its rows were fitted against another public router "
                                  f"row ({rec['public_row_sha256'][:12]}..., {public_dir} ships {digest[:12]}...); "
                                  "refit with `flexmoe package --fit-router` from this public model's branch")
    override = {router_weight_key(i): torch.stack([public[i]] + [r[i] for r in rows]) for i in range(cfg.num_layers)}
    return merge(public_dir, packages, out_dir, routing="topk", router_override=override,
                 extra_meta={"calibration": {"mode": OWNER_CALIBRATION, "owners": dict(zip(domains, records))}}, **merge_kw)
