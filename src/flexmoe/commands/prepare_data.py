"""`flexmoe prepare-data`: tokenize text/jsonl/csv files into .npy shards with a manifest."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe prepare-data`: tokenize text/jsonl/csv files into .npy shards with a manifest.

    With `--format sft` the inputs are chat jsonl files (`{"messages": [{"role", "content"}, ...]}`
    per line) and the output is SFT data for `flexmoe train data.format=sft`: tokens, a loss mask
    on assistant tokens only and example boundaries (see flexmoe.data.sft).

    With `--user-field NAME` (jsonl inputs) each record's NAME field is its user id: the output
    gains `user_ids.npy`, each document's user as a dense id, which `privacy.unit=user` trains on
    (every user one privacy unit). A record without the field is refused.
    """
    from flexmoe.data import load_tokenizer, prepare_data, train_bpe

    p = argparse.ArgumentParser(prog="flexmoe prepare-data", description=main.__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a Hugging Face tokenizer directory")
    p.add_argument("--train-bpe", type=int, default=0, metavar="VOCAB",
                   help="train a byte-level BPE of this size on the inputs and save it to --tokenizer")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--domain")
    p.add_argument("--text-field", default="text")
    p.add_argument("--user-field", metavar="NAME",
                   help="jsonl field holding each record's user id; writes user_ids.npy for privacy.unit=user")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", default="lm", choices=["lm", "sft"],
                   help="lm: plain text -> token shards; sft: chat jsonl ('messages') -> windows with an "
                        "assistant-only loss mask, for `flexmoe train data.format=sft`")
    a = p.parse_args(argv)
    if a.format == "sft":
        return _prepare_sft(a)
    if a.train_bpe:
        from flexmoe.data.documents import expand_inputs
        from flexmoe.io.files import check_disjoint, check_output_dir

        if a.tokenizer == "bytes":
            p.error("--train-bpe saves the tokenizer it trains to --tokenizer DIR; give that directory")
        if a.train_bpe < 258:
            p.error(f"--train-bpe {a.train_bpe}: below 258 (256 bytes + end-of-text + padding); raise it")
        # Checked before the tokenizer is written, so a refusal leaves nothing behind; the tokenizer
        # must not land in the inputs or the output either.
        check_disjoint(a.out, a.inputs, "--out")
        check_output_dir(a.out, a.overwrite, "--overwrite")
        check_disjoint(a.tokenizer, [*a.inputs, a.out], "--tokenizer (where --train-bpe saves)")
        texts = (f.read_text(errors="replace") for f in expand_inputs(a.inputs))
        tok = train_bpe(texts, a.train_bpe, a.tokenizer)
    else:
        tok = load_tokenizer(a.tokenizer)
    m = prepare_data(a.inputs, a.out, tok, dtype=a.dtype, domain=a.domain, text_field=a.text_field,
                     user_field=a.user_field, overwrite=a.overwrite, overwrite_flag="--overwrite")
    users = f", {m['users']['num_users']:,} users" if "users" in m else ""
    print(f"{a.out}: {m['num_tokens']:,} tokens in {len(m['shards'])} shard(s), dtype {m['dtype']}{users}")
    return 0


def _prepare_sft(a: argparse.Namespace) -> int:
    """`prepare-data --format sft`: chat jsonl -> tokens.npy, loss_mask.npy, doc_starts.npy + manifest."""
    from flexmoe.data import load_tokenizer
    from flexmoe.data.sft import prepare_sft

    # These options describe plain-text shards; silently ignoring them would surprise.
    for flag, value, default in (("--train-bpe", a.train_bpe, 0), ("--dtype", a.dtype, "auto"),
                                 ("--text-field", a.text_field, "text"), ("--domain", a.domain, None),
                                 ("--user-field", a.user_field, None)):
        if value != default:
            raise ValueError(f"{flag} does not apply to --format sft; drop it")
    m = prepare_sft(a.inputs, a.out, load_tokenizer(a.tokenizer), overwrite=a.overwrite, overwrite_flag="--overwrite")
    print(f"{a.out}: {m['num_examples']:,} chat examples, {m['num_tokens']:,} tokens "
          f"({m['num_trained_tokens']:,} trained)")
    return 0
