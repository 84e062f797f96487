"""The Hugging Face round trip with a real BPE tokenizer (issue 18): an HF checkpoint with a BPE
tokenizer trained offline -> import-hf -> router-embed -> branch -> train -> package -> merge ->
export-hf, then AutoTokenizer + AutoModelForCausalLM.generate (greedy) give exactly what
`flexmoe generate --greedy` gives. Every step is the CLI, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from flexmoe.convert.hf_export import export_hf
from flexmoe.data.tokenize import train_bpe
from flexmoe.io.model_dir import load_model_dir, save_model_dir

from helpers import TINY, make_public

TEXT = "".join(f"def add_{i}(a, b):\n    return a + b + {i}\n\n" for i in range(200))
PROMPT = "def add_7(a, b):\n"


def _cli(cwd, *args):
    r = subprocess.run([sys.executable, "-m", "flexmoe.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"flexmoe {args[0]}: {r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.slow
def test_bpe_release_generates_what_flexmoe_generates(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = tmp_path / "bpe"
    train_bpe([TEXT], 300, bpe)
    # the HF checkpoint a user starts from: a dense OLMo-2 with that tokenizer
    made = make_public(tmp_path / "made", TINY.replace(vocab_size=300, max_seq_len=128))
    cfg, sd, meta = load_model_dir(made)
    native = save_model_dir(tmp_path / "native", cfg, sd, {"kind": "public", "fingerprint": meta["fingerprint"],
                                                          "tokenizer": str(bpe)})
    hf_in = export_hf(native, tmp_path / "hf-in")
    (tmp_path / "code.txt").write_text(TEXT)
    _cli(tmp_path, "import-hf", hf_in, "public")
    _cli(tmp_path, "prepare-data", "code.txt", "--out", "data", "--tokenizer", tmp_path / "public" / "tokenizer")
    _cli(tmp_path, "router-embed", "--model", "public", "--data", "data", "--public", "--seq-len", "32")
    _cli(tmp_path, "router-embed", "--model", "public", "--data", "data", "--out", "rows.safetensors", "--seq-len", "32")
    _cli(tmp_path, "branch", "public", "anchor", "--router-embedding", "rows.safetensors")
    _cli(tmp_path, "train", "stage=expert_anchor", "init_from=anchor", "+data.train.code=data", "stage.public_mix=0",
         "data.seq_len=32", "data.batch_size=8", "trainer.steps=40", "optim.lr=1e-2", "optim.warmup_steps=2",
         "trainer.log_every=20", "trainer.threads=1", "out_dir=run")
    _cli(tmp_path, "package", "run/final", "pkg", "--owner", "acme", "--domain", "code", "--allowed-uses", "research")
    _cli(tmp_path, "merge", "public", "pkg", "--out", "merged", "--routing", "topk", "--top-k", "2")
    _cli(tmp_path, "export-hf", "merged", "release", "--use", "research")
    ours = json.loads(_cli(tmp_path, "generate", "merged", "--prompt", PROMPT, "--greedy", "--max-new-tokens", "12",
                           "--json"))["continuations"][0]

    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "release"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "release")).eval()
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert theirs == ours and len(ours) > 0, (theirs, ours)
    # the tokenizer files the release ships are the ones the data was made with
    assert (tmp_path / "release" / "tokenizer.json").read_bytes() == (bpe / "tokenizer.json").read_bytes()
