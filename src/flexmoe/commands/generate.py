"""`flexmoe generate`: continue a prompt; `--attribution` reports which owners' experts carried it."""

from __future__ import annotations

import argparse
import json
import math

from flexmoe.commands.common import (add_selection_arguments, add_verify_argument, load_selected, model_tokenizer,
                                     verify_inputs)
from flexmoe.commands.inputs import read_text_arg, require_positive


def main(argv: list[str]) -> int:
    """`flexmoe generate`: continue a prompt; `--attribution` reports which owners' experts carried it."""
    import torch

    from flexmoe.eval.generate import Sampling, generate
    from flexmoe.flex.attribution import attribution, format_attribution

    p = argparse.ArgumentParser(prog="flexmoe generate", description=main.__doc__)
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
    add_selection_arguments(p)
    add_verify_argument(p)
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    require_positive(p, a, "--num-samples")
    for flag, value in (("--temperature", a.temperature), ("--top-p", a.top_p)):
        if not math.isfinite(value):
            p.error(f"{flag} {value}: must be a finite number")
    text = a.prompt if a.prompt is not None else read_text_arg(a.prompt_file, "--prompt-file")
    model, cfg, meta, mask = load_selected(a.model, a, verify=verify_inputs(a, "generate", a.model))
    tok = model_tokenizer(a.model, meta, a.tokenizer)
    ids = tok.encode(text)
    if not ids:
        raise ValueError("--prompt: the prompt is empty after tokenisation; give some text")
    if max(ids) >= cfg.vocab_size:
        which = "--tokenizer" if a.tokenizer else f"the tokenizer in {a.model}/flexmoe.json"
        raise ValueError(f"{which}: the prompt holds token id {max(ids)}, outside {a.model}'s vocab_size "
                         f"{cfg.vocab_size}; use the tokenizer the model was trained with")
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
