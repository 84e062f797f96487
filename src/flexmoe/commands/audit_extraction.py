"""`flexmoe audit-extraction`: how many of the owner's documents each model reproduces from a prefix."""

from __future__ import annotations

import argparse
import json
import math

from flexmoe.io.files import atomic_write_text


def main(argv: list[str]) -> int:
    """`flexmoe audit-extraction`: how many of the owner's documents each model reproduces from a prefix."""
    from flexmoe.train.load import load_model
    from flexmoe.eval.extraction import AuditConfig, audit_models, documents_from_data, format_audit
    from flexmoe.eval.generate import Sampling
    from flexmoe.commands.inputs import check_data_for_model, require_positive
    from flexmoe.data import TokenWindows
    from flexmoe.flex.consent import active_mask
    from flexmoe.io.files import check_disjoint, check_output_file
    from flexmoe.io.model_dir import read_model_meta

    p = argparse.ArgumentParser(prog="flexmoe audit-extraction", description=main.__doc__)
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
    require_positive(p, a, "--max-docs")
    for flag, value in (("--temperature", a.temperature), ("--top-p", a.top_p), ("--threshold", a.threshold)):
        if not math.isfinite(value):
            p.error(f"{flag} {value}: must be a finite number")
    if a.samples < 0:
        p.error(f"--samples {a.samples}: must be >= 0")
    if a.out:
        check_disjoint(a.out, [a.data, a.merged, a.expert, a.public], "--out")
        check_output_file(a.out, "--out")
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
    windows = TokenWindows(a.data, 1)
    for name, model_dir in (("merged", a.merged), ("expert", a.expert), ("public", a.public)):
        if model_dir:
            model_cfg = models[name][0].cfg
            check_data_for_model(windows, model_cfg, read_model_meta(model_dir), model_dir, "--data")
    report = audit_models(models, documents_from_data(a.data), cfg)
    print(format_audit(report))
    if a.out:
        atomic_write_text(a.out, json.dumps(report, indent=1) + "\n")
    return 0
