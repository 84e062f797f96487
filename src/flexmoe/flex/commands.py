"""CLI subcommands for governance: generation with attribution, the extraction audit, the consent
registry (wired into `flexmoe` by cli.py through `COMMANDS`).

    flexmoe generate MODEL --prompt TEXT [--greedy | --temperature T --top-k K --top-p P]
                     [--attribution] [--opt-out NAME,...] [--use USE [--date YYYY-MM-DD]]
    flexmoe audit-extraction --data DIR [--merged DIR --owner NAME] [--expert DIR] [--public DIR]
    flexmoe consent MODEL_OR_PACKAGE [--use USE] [--date YYYY-MM-DD]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_consent_arguments(p: argparse.ArgumentParser) -> None:
    """`--allowed-uses` and `--expires` for `flexmoe package` (pass them to make_package)."""
    from flexmoe.flex.consent import USES

    p.add_argument("--allowed-uses", type=lambda s: [u for u in s.split(",") if u], default=None,
                   help=f"comma-separated uses the owner consents to ({', '.join(USES)}); none: no use= request "
                        "activates this expert")
    p.add_argument("--expires", help="last day of consent, YYYY-MM-DD (default: no expiry)")


def _add_selection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opt-out", default="", help="comma-separated owners or domains to switch off")
    p.add_argument("--use", help="activate only experts whose consent covers this use (research, commercial, ...)")
    p.add_argument("--date", help="the date consent is checked for (default: today, UTC)")


def _load(model_dir: str, a: argparse.Namespace):
    from flexmoe.flex.consent import load_for_use

    return load_for_use(model_dir, use=a.use, opt_out=[o for o in a.opt_out.split(",") if o], today=a.date)


def _tokenizer(model_dir: str, meta: dict, override: str | None):
    from flexmoe.data import load_tokenizer

    spec = override or meta.get("tokenizer")
    if spec is None:
        raise ValueError(f"{Path(model_dir) / 'flexmoe.json'}: records no tokenizer; pass --tokenizer bytes|DIR")
    if isinstance(spec, dict) and spec.get("type") == "hf" and not Path(spec["path"]).is_absolute():
        spec = dict(spec, path=str(Path(model_dir) / spec["path"]))  # import-hf records it relative to the model
    return load_tokenizer(spec)


def cmd_generate(argv: list[str]) -> int:
    """`flexmoe generate`: continue a prompt; `--attribution` reports which owners' experts carried it."""
    import torch

    from flexmoe.eval.generate import Sampling, generate
    from flexmoe.flex.attribution import attribution, format_attribution

    p = argparse.ArgumentParser(prog="flexmoe generate", description=cmd_generate.__doc__)
    p.add_argument("model", help="native model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file whose text is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attribution", action="store_true", help="print each expert's share of the generated tokens")
    p.add_argument("--per-layer", action="store_true", help="with --attribution: shares per MoE layer too")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tokenizer", help="override the tokenizer recorded in flexmoe.json (bytes or a directory)")
    _add_selection_arguments(p)
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    model, cfg, meta, mask = _load(a.model, a)
    tok = _tokenizer(a.model, meta, a.tokenizer)
    text = a.prompt if a.prompt is not None else Path(a.prompt_file).read_text()
    ids = tok.encode(text)
    if not ids:
        raise ValueError("--prompt: the prompt is empty after tokenisation; give some text")
    prompt = torch.tensor([ids])
    sampling = Sampling(greedy=a.greedy, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        num_samples=a.num_samples)
    conts = generate(model, prompt, a.max_new_tokens, sampling, expert_mask=mask,
                     generator=torch.Generator().manual_seed(a.seed))
    texts = []
    for row in conts.tolist():
        if tok.eos_id is not None and tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    result: dict = {"prompt": text, "continuations": texts,
                    "active_experts": None if mask is None else mask.tolist()}
    if a.attribution:
        if not cfg.is_moe:
            raise ValueError(f"{a.model}: a dense model has no experts to attribute; drop --attribution")
        full = torch.cat([prompt.repeat(conts.shape[0], 1), conts], dim=1)
        P = prompt.shape[1]
        # Position t's routing produced token t+1: the generated tokens came from positions P-1 .. end-1.
        result["attribution"] = attribution(model, full[:, :-1], meta.get("experts"), expert_mask=mask,
                                            positions=slice(P - 1, None))
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    for t in texts:
        print(text + t)
        print("---")
    if a.attribution:
        print(format_attribution(result["attribution"], per_layer=a.per_layer))
    return 0


def cmd_audit_extraction(argv: list[str]) -> int:
    """`flexmoe audit-extraction`: how many of the owner's documents each model reproduces from a prefix."""
    from flexmoe.convert.safetensors_io import load_model
    from flexmoe.eval.extraction import AuditConfig, audit_models, documents_from_data, format_audit
    from flexmoe.eval.generate import Sampling
    from flexmoe.flex.consent import active_mask

    p = argparse.ArgumentParser(prog="flexmoe audit-extraction", description=cmd_audit_extraction.__doc__)
    p.add_argument("--data", required=True, help="the owner's own documents: a `flexmoe prepare-data` directory")
    p.add_argument("--merged", help="merged model directory")
    p.add_argument("--owner", help="with --merged: the owner or domain audited; adds a row with it opted out")
    p.add_argument("--expert", help="the owner's trained 2-expert model directory (the expert alone, with the anchor)")
    p.add_argument("--public", help="the public model directory (what anyone could extract already)")
    p.add_argument("--prefix-len", type=int, default=32)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--max-docs", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.9, help="normalised Levenshtein similarity that counts")
    p.add_argument("--samples", type=int, default=4, help="sampled continuations per prefix (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy continuation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the full report as JSON here")
    a = p.parse_args(argv)
    if not (a.merged or a.expert or a.public):
        p.error("give at least one of --merged, --expert, --public")
    if a.owner and not a.merged:
        p.error("--owner names an expert of the --merged model")
    strategies = [] if a.no_greedy else [Sampling(greedy=True)]
    if a.samples > 0:
        strategies.append(Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, num_samples=a.samples))
    cfg = AuditConfig(prefix_len=a.prefix_len, suffix_len=a.suffix_len, max_docs=a.max_docs, threshold=a.threshold,
                      strategies=strategies, seed=a.seed)
    cfg.validate()
    models = {}
    if a.merged:
        from flexmoe.flex.consent import load_for_use

        merged, _, meta, _ = load_for_use(a.merged)  # checks every expert's tensor hash
        models["merged"] = (merged, None)
        if a.owner:
            models[f"merged-without/{a.owner}"] = (merged, active_mask(meta.get("experts") or [], opt_out=[a.owner]))
    if a.expert:
        models["expert"] = (load_model(a.expert)[0], None)
    if a.public:
        models["public"] = (load_model(a.public)[0], None)
    report = audit_models(models, documents_from_data(a.data), cfg)
    print(format_audit(report))
    if a.out:
        out = Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
    return 0


def cmd_consent(argv: list[str]) -> int:
    """`flexmoe consent`: show a merged model's (or a package's) consent registry; with --use, who is active."""
    from flexmoe.convert.safetensors_io import load_model_dir, read_json
    from flexmoe.flex.consent import consent_mask, consent_rows, verify_expert_hashes

    p = argparse.ArgumentParser(prog="flexmoe consent", description=cmd_consent.__doc__)
    p.add_argument("path", help="merged model directory, or an expert package directory")
    p.add_argument("--use", help="show which experts a request for this use activates")
    p.add_argument("--date", help="the date consent is checked for (default: today, UTC)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = Path(a.path)
    if (path / "manifest.json").is_file():  # an expert package
        m = read_json(path / "manifest.json")
        experts, checked = [dict(m, slot=1)], None
        rows = consent_rows([{"owner": "public", "domain": "public"}] + experts, a.use, a.date)[1:]
    else:
        cfg, sd, meta = load_model_dir(path)
        experts = meta.get("experts") or []
        checked = verify_expert_hashes(sd, meta, cfg.num_layers, path) if cfg.is_moe else 0
        if a.use:
            consent_mask(experts, a.use, a.date)  # validates the use name
        rows = consent_rows(experts, a.use, a.date)
    if a.json:
        print(json.dumps({"experts": rows, "tensor_hashes_checked": checked}, indent=1))
        return 0
    head = f"{'slot':>4}  {'owner':<18} {'domain':<14} {'licence':<14} {'uses':<22} {'expires':<10}  eps"
    print(head + ("  active" if a.use else ""))
    for r in rows:
        uses = ",".join(r["allowed_uses"]) if r["allowed_uses"] else "(none recorded)"
        eps = f"{r['dp_epsilon']:.2f}" if isinstance(r["dp_epsilon"], (int, float)) else "-"
        line = (f"{r['slot']:>4}  {str(r['owner']):<18} {str(r['domain']):<14} {str(r['licence']):<14} {uses:<22} "
                f"{str(r['expires'] or '-'):<10}  {eps}")
        print(line + (f"  {'yes' if r['active'] else 'no'}" if a.use else ""))
    if checked is not None:
        print(f"tensor hashes checked: {checked} of {len(rows)} experts", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "audit-extraction": cmd_audit_extraction, "consent": cmd_consent}
