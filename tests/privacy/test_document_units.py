"""Documents as the privacy unit (issue 17, item 2): windows of one document only, padding masked,
truncation counted; book-keeping clipping equal to the reference on padded multi-window units; a
DP run with privacy.unit=document records its unit."""

import numpy as np
import pytest
import torch
from privhelpers import BYTE_TINY, make_byte_public, prepared_docs, stdlib_text, train_private
from test_book_keeping import _model

from flexmoe.config.train import DataConfig, OptimConfig, RunConfig, StageConfig, TrainerConfig
from flexmoe.data import TokenWindows
from flexmoe.data.errors import DataError
from flexmoe.data.units import DocumentUnits, WindowUnits
from flexmoe.flex.branch import branch
from flexmoe.train import ghost
from flexmoe.train.privacy import PrivacyConfig, clipped_sample_grads, private_gradient, trainable_masks

EOS = 256


def _docs():
    text = stdlib_text(20_000)
    # documents of very different lengths: 5 to ~900 bytes
    cuts = [0, 5, 60, 61 + 200, 300, 1200, 1260, 2000, 2900, 3000]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def test_document_windows_hold_one_document_each(tmp_path):
    docs = _docs()
    data = prepared_docs(tmp_path, "docs", docs)
    units = DocumentUnits(TokenWindows(data, 32), max_windows=4, pad_id=257)
    assert len(units) == len(docs)
    tokens, mask, unit = units.batch(np.arange(len(docs)))
    for j, d in enumerate(docs):
        rows = np.flatnonzero(unit == j)
        want = list(d.encode()) + [EOS]
        got = []
        for k, r in enumerate(rows):
            n = int(mask[r].sum()) + 1  # real tokens in this window
            assert (tokens[r, n:] == 257).all() and mask[r, n - 1:].sum() == 0
            got += list(tokens[r, :n]) if k == 0 else list(tokens[r, 1:n])  # windows share one token
            assert EOS not in tokens[r, :n - 1]  # no other document inside
        cap = 4 * 32 + 1
        assert got == want[:cap], j
        assert len(rows) == min(4, -(-(len(want) - 1) // 32))
    dropped = sum(max(0, len(d.encode()) + 1 - (4 * 32 + 1)) for d in docs)
    assert units.tokens_dropped == dropped > 0
    assert units.tokens_kept == sum(min(len(d.encode()) + 1, 4 * 32 + 1) - 1 for d in docs)
    assert len(WindowUnits(TokenWindows(data, 32))) == len(TokenWindows(data, 32))


def test_document_units_need_document_boundaries(tmp_path):
    from flexmoe.data import ByteTokenizer, prepare_data

    src = tmp_path / "t.txt"
    src.write_text(stdlib_text(5000))
    prepare_data([src], tmp_path / "noeos", ByteTokenizer(), append_eos=False, progress=False)
    with pytest.raises(DataError, match="no document boundaries"):
        DocumentUnits(TokenWindows(tmp_path / "noeos", 32), max_windows=4)


def test_book_keeping_on_padded_documents_equals_the_reference(tmp_path):
    data = prepared_docs(tmp_path, "docs", _docs())
    check_book_keeping_on_units(DocumentUnits(TokenWindows(data, 24), max_windows=3, pad_id=0), [0, 2, 4, 5, 7])


def check_book_keeping_on_units(units, picks):
    """Book-keeping norms and update equal the per-unit-backward reference on `units.batch(picks)`
    (padded multi-window units; also used by test_user_units.py)."""
    tokens, mask, unit = units.batch(np.array(picks))
    tokens = torch.from_numpy(tokens) % 97  # the test model's vocabulary
    mask, unit = torch.from_numpy(mask), torch.from_numpy(unit)
    U = len(picks)
    assert mask.sum() < mask.numel() and len(set(unit.tolist())) == U and len(unit) > U
    model = _model("topk")
    params = [p for p in model.parameters() if p.requires_grad]
    masks = trainable_masks(params)
    raw = list(clipped_sample_grads(model, tokens, params, float("inf"), masks, unit_of_window=unit, loss_mask=mask))
    ref_norms = np.array([n for _, n, _ in raw])
    s = np.sort(ref_norms)
    clip = float(s[1] + s[2]) / 2
    _, norms, _ = ghost.book_keeping_grads(model, tokens, unit, U, params, clip, masks, loss_mask=mask)
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-5)
    kw = dict(max_grad_norm=clip, noise_multiplier=0.5, expected_batch_size=4.0, masks=masks, unit_of_window=unit,
              loss_mask=mask)
    ref, _ = private_gradient(model, tokens, params, generator=torch.Generator().manual_seed(1),
                              clipping="per_unit_backward", **kw)
    bk, _ = private_gradient(model, tokens, params, generator=torch.Generator().manual_seed(1),
                             clipping="book_keeping", **kw)
    for r, b in zip(ref, bk):
        torch.testing.assert_close(b, r, atol=1e-5, rtol=1e-5)
    # a padded target takes no part: changing the tokens behind the mask changes nothing
    noisy = tokens.clone()
    noisy[:, 1:][mask == 0] = 5
    again, _ = private_gradient(model, noisy, params, generator=torch.Generator().manual_seed(1),
                                clipping="book_keeping", **kw)
    for a, b in zip(again, bk):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_dp_run_with_document_units(tmp_path):
    pytest.importorskip("opacus")
    cfg_model = BYTE_TINY.replace(d_model=32, d_ff=64)
    anchor = branch(make_byte_public(tmp_path, cfg_model), tmp_path / "anchor")
    data = prepared_docs(tmp_path, "docs", _docs() * 30)
    run = RunConfig(out_dir=str(tmp_path / "run"), init_from=str(anchor),
                    data=DataConfig(train={"code": str(data)}, seq_len=32, batch_size=4),
                    stage=StageConfig(name="expert_anchor", freeze="expert_anchor"),
                    optim=OptimConfig(lr=1e-3, warmup_steps=0), trainer=TrainerConfig(steps=3, log_every=1))
    dp = train_private(run, PrivacyConfig(noise_multiplier=1.0, delta=1e-4, noise_seed=0, unit="document",
                                          max_unit_windows=4))["dp"]
    assert dp["unit"].startswith("document") and dp["num_units"] == 270
    assert dp["sampling_rate"] == pytest.approx(4 / 270) and dp["clipping"] == "book_keeping"
    assert dp["tokens_not_trained"] > 0
