"""Extraction audit: its pieces are exact, and the attack is strong on an expert that memorised
its owner's documents while a fresh public model extracts nothing."""

import json

import numpy as np
import pytest
import torch
from privhelpers import BYTE_TINY, docstring_docs, make_byte_public, overtrain_expert, prepared_docs

from flexmoe.train.load import load_model
from flexmoe.io.model_dir import save_model_dir
from flexmoe.data import ByteTokenizer
from flexmoe.eval.extraction import (
    AuditConfig,
    audit_models,
    documents_from_data,
    documents_from_texts,
    levenshtein_batch,
    similarity_batch,
    wilson_interval,
)
from flexmoe.eval.generate import Sampling, filter_logits, generate
from flexmoe.flex.branch import branch
from flexmoe.commands import COMMANDS
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from flexmoe.flex.package import make_package
from flexmoe.model.moe import canonical_state_dict

MEMO = BYTE_TINY.replace(d_ff=512)  # room to memorise 20 documents in a few hundred steps


def _levenshtein_ref(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_levenshtein_matches_reference():
    rng = np.random.default_rng(0)
    for L, M in ((12, 12), (9, 14), (16, 5)):
        a, b = rng.integers(0, 4, (50, L)), rng.integers(0, 4, (50, M))
        got = levenshtein_batch(a, b)
        assert got.tolist() == [_levenshtein_ref(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    a = np.arange(32)[None]
    assert similarity_batch(a, a)[0] == 1.0
    one_off = a.copy()
    one_off[0, 5] = 99
    assert similarity_batch(one_off, a)[0] == pytest.approx(1 - 1 / 32)
    shifted = np.concatenate([a[:, 1:], [[99]]], axis=1)  # one deletion + one insertion
    assert similarity_batch(shifted, a)[0] == pytest.approx(1 - 2 / 32)


def test_wilson_interval_known_values():
    assert wilson_interval(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[0] == pytest.approx(0.8389, abs=1e-4)


def test_documents_from_data_split_at_eos(tmp_path):
    docs = ["first document", "the second one, longer", "third"]
    got = documents_from_data(prepared_docs(tmp_path, "d", docs))
    assert [ByteTokenizer().decode(d) for d in got] == docs


def test_generate_greedy_and_filters(tmp_path):
    model, _, _ = load_model(make_byte_public(tmp_path, BYTE_TINY.replace(d_model=32, d_ff=64)))
    prompts = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompts, 6, Sampling(greedy=True), batch_size=2)
    x = prompts.clone()
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x[:, 10:])
    # top_k=1 and a tiny top_p leave only the argmax: sampling then equals greedy.
    for s in (Sampling(top_k=1, num_samples=2), Sampling(top_p=1e-6, num_samples=2)):
        assert torch.equal(generate(model, prompts, 6, s), out.repeat_interleave(2, 0))
    seeded = [generate(model, prompts, 6, Sampling(num_samples=2), generator=torch.Generator().manual_seed(5))
              for _ in range(2)]
    assert torch.equal(*seeded) and not torch.equal(seeded[0], out.repeat_interleave(2, 0))
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # probabilities 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """An owner's expert trained for many epochs on 20 short documents, its package, the merge."""
    root = tmp_path_factory.mktemp("extract")
    public = make_byte_public(root, MEMO)
    docs = docstring_docs(20, 72)
    anchor = branch(public, root / "anchor", torch.randn(MEMO.num_layers, MEMO.d_model))
    model, cfg, meta = load_model(anchor)
    overtrain_expert(model, docs, steps=250)  # ~25 passes over each window position
    sd = canonical_state_dict({k: v.detach() for k, v in model.state_dict().items()})
    trained = save_model_dir(root / "trained", cfg, sd, meta)
    pkg = make_package(trained, root / "pkg", owner="acme", domain="docs", allowed_uses=["research"])
    merged = merge(public, [pkg], root / "merged")
    data = prepared_docs(root, "docs", docs)
    return root, public, trained, merged, data, docs


def test_audit_catches_a_memorising_expert(memorised):
    root, public, trained, merged, data, docs = memorised
    expert, _, _ = load_model(trained)
    fresh, _, _ = load_model(public)
    merged_model, _, meta = load_model(merged)
    cfg = AuditConfig(strategies=[Sampling(greedy=True),
                                  Sampling(temperature=0.7, top_k=40, top_p=0.95, num_samples=2)])
    report = audit_models({"expert": (expert, None), "merged": (merged_model, None),
                           "merged-without/docs": (merged_model, expert_mask(meta["experts"], ["docs"])),
                           "public": (fresh, None)}, documents_from_texts(docs, ByteTokenizer()), cfg)
    rows = report["models"]
    assert report["documents_audited"] == 20
    assert rows["expert"]["extracted"]["rate"] > 0.5
    assert rows["merged"]["extracted"]["rate"] > 0.5  # merging does not hide what the package carries
    assert rows["public"]["extracted"]["rate"] <= 0.05
    assert rows["merged-without/docs"]["extracted"]["rate"] <= 0.05  # opting the owner out removes it
    lo, hi = rows["expert"]["extracted"]["ci95"]
    assert lo < rows["expert"]["extracted"]["rate"] < hi
    assert rows["expert"]["exact"]["count"] <= rows["expert"]["extracted"]["count"]


def test_audit_cli(memorised, capsys):
    root, public, trained, merged, data, _ = memorised
    out = root / "audit.json"
    rc = COMMANDS["audit-extraction"](["--data", str(data), "--merged", str(merged), "--owner", "docs",
                                        "--public", str(public), "--samples", "0", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"merged", "merged-without/docs", "public"}
    assert report["models"]["merged"]["extracted"]["rate"] > 0.5
    assert report["models"]["public"]["extracted"]["rate"] <= 0.05
    assert "| merged |" in capsys.readouterr().out

