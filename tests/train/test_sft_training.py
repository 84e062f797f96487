"""SFT through the trainer (data.format=sft): the loss falls, only the sft freeze plan's groups
move, targets outside assistant turns give zero gradient, and dict batches are deterministic and
resumable like token batches."""

import fnmatch
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flexmoe.config import ModelConfig
from flexmoe.config.train import RunConfig
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.data import BatchLoader, ByteTokenizer, Mixture, prepare_data
from flexmoe.data.chat_corpora import arithmetic_chats
from flexmoe.data.sft import SFTWindows, prepare_sft
from flexmoe.flex.branch import branch
from flexmoe.io.fingerprint import fingerprint
from flexmoe.train.freeze import PLANS
from flexmoe.model import Transformer
from flexmoe.train.trainer import build_model, evaluate_loss, train, training_loss

SEQ = 64


def _jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = ByteTokenizer()
    prepare_sft([_jsonl(root / "train.jsonl", arithmetic_chats(400, seed=0))], root / "train", tok)
    prepare_sft([_jsonl(root / "val.jsonl", arithmetic_chats(60, seed=1))], root / "val", tok)
    # a dense public model (random init: SFT here teaches the format from scratch) and its anchor
    cfg = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    sd = model.state_dict()
    public = save_model_dir(root / "public", cfg, sd, {"kind": "public", "fingerprint": fingerprint(sd)})
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(cfg.num_layers, cfg.d_model, generator=g) for _ in range(2)]
    anchor = branch(public, root / "anchor", rows[1], public_rows=rows[0])
    return root, anchor


def _cfg(out, root, anchor, **over):
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir = str(out)
    cfg.init_from = str(anchor)
    cfg.stage.update(name="sft", freeze="sft")
    cfg.data.update(format="sft", seq_len=SEQ, batch_size=8)
    cfg.data.train = {"math": str(root / "train")}
    cfg.data.val = {"math": str(root / "val")}
    cfg.trainer.update(steps=30, log_every=10, threads=1)
    cfg.optim.update(lr=3e-3, warmup_steps=3)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_sft_stage_trains_and_keeps_frozen_groups_bit_identical(tmp_path, sft_data):
    root, anchor = sft_data
    val = SFTWindows(root / "val", SEQ)
    before_model, _, _ = load_model(anchor)
    initial = evaluate_loss(before_model, val, 8, 8)
    res = train(_cfg(tmp_path / "run", root, anchor))

    print(f"masked val loss: anchor {initial:.3f} -> after sft {res['val_loss']['math']:.3f}")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    # Random init starts near ln(258) = 5.55 on assistant bytes; 30 steps of embeddings, head and
    # expert 1 must take the masked validation loss below 75% of that (seen: 5.58 -> 3.68).
    assert res["val_loss"]["math"] < 0.75 * initial, (initial, res["val_loss"])
    assert losses[-1] < 0.75 * losses[0], losses
    # the reported validation loss is the masked loss of the final model
    after_model, _, _ = load_model(res["final"])
    assert res["val_loss"]["math"] == pytest.approx(evaluate_loss(after_model, val, 8, 8), rel=1e-6)

    _, a, _ = load_model_dir(anchor)
    _, b, _ = load_model_dir(res["final"])
    frozen = PLANS["sft"].frozen
    moved = []
    for k, v in a.items():
        if any(fnmatch.fnmatchcase(k, pat) for pat in frozen):  # norms and attention
            assert torch.equal(b[k], v), f"{k} is frozen under sft but moved"
        elif ".ffn.experts." in k or ".ffn.router." in k:  # anchor slot / public row frozen, owner's trains
            assert torch.equal(b[k][0], v[0]), f"slot 0 of {k} moved"
            if not torch.equal(b[k][1], v[1]):
                moved.append(k)
        elif not torch.equal(b[k], v):
            moved.append(k)
    assert {"embed.weight", "lm_head.weight"} <= set(moved), moved
    assert all(any(k.endswith(f"ffn.experts.{n}") for k in moved) for n in ("gate_proj", "up_proj", "down_proj"))


def test_targets_outside_assistant_turns_get_zero_gradient_through_the_trainer(tmp_path, sft_data):
    root, anchor = sft_data
    model, _, _ = build_model(_cfg(tmp_path, root, anchor))  # the sft freeze plan applied
    batch = next(BatchLoader(SFTWindows(root / "train", SEQ), 8, seed=0))
    tokens, mask, docs = batch["tokens"], batch["loss_mask"], batch["doc_ids"]
    assert 0 < mask.sum() < mask.numel() and docs.max() > 0  # headers masked, several examples packed

    def grads(targets):
        model.zero_grad(set_to_none=True)
        _, total = training_loss(model, tokens[:, :-1], targets, mask, docs)
        total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(tokens[:, 1:])
    assert {"embed.weight", "lm_head.weight"} <= set(ref)
    off = tokens[:, 1:].clone()
    off[mask == 0] = (off[mask == 0] + 17) % 256  # every target outside assistant turns changed
    same = grads(off)
    assert ref.keys() == same.keys()
    for n in ref:
        assert torch.equal(ref[n], same[n]), n
    on = tokens[:, 1:].clone()
    on[mask == 1] = (on[mask == 1] + 17) % 256
    assert any(not torch.equal(ref[n], g) for n, g in grads(on).items())


def test_sft_batches_are_deterministic_and_resumable(sft_data):
    root, _ = sft_data
    w = SFTWindows(root / "train", SEQ)
    one = BatchLoader(w, 4, seed=3)
    batches = [next(one) for _ in range(6)]
    assert batches[0]["tokens"].shape == (4, SEQ + 1) and batches[0]["loss_mask"].shape == (4, SEQ)
    # the same windows a token loader would pick: row i is window perm[i]
    perm = np.random.default_rng([3, 0]).permutation(len(w))
    assert torch.equal(batches[0]["tokens"][1], torch.from_numpy(w[int(perm[1])]["tokens"]))
    resumed = BatchLoader(w, 4, seed=3)
    [next(resumed) for _ in range(2)]
    again = BatchLoader(w, 4, seed=3)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    for ref in batches[2:]:
        got = next(again)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    # a mixture of SFT domains batches dicts too
    mix = BatchLoader(Mixture({"a": (w, 1.0), "b": (SFTWindows(root / "val", SEQ), 1.0)}), 4, seed=0)
    b = next(mix)
    assert set(b) == {"tokens", "loss_mask", "doc_ids"} and b["doc_ids"].shape == (4, SEQ)


def test_sft_format_refuses_token_shards_naming_the_setting(tmp_path, sft_data):
    root, anchor = sft_data
    (tmp_path / "plain.txt").write_text("plain text, not chats\n" * 200)
    prepare_data([tmp_path / "plain.txt"], tmp_path / "plain", ByteTokenizer(), progress=False)
    with pytest.raises(ValueError, match=r"data\.val\.math=.*not SFT data"):
        train(_cfg(tmp_path / "r", root, anchor, **{"data.val": {"math": str(tmp_path / "plain")}}))
    with pytest.raises(ValueError, match=r"data\.format='chat'"):
        train(_cfg(tmp_path / "r2", root, anchor, **{"data.format": "chat"}))


def test_prepare_data_cli_writes_sft_data(tmp_path, capsys):
    from flexmoe.cli import main

    chats = _jsonl(tmp_path / "c.jsonl", arithmetic_chats(20, seed=2))
    assert main(["prepare-data", str(chats), "--out", str(tmp_path / "sft"), "--format", "sft"]) == 0
    w = SFTWindows(tmp_path / "sft", SEQ)
    assert w.manifest["num_examples"] == 20 and 0 < w.manifest["num_trained_tokens"] < w.manifest["num_tokens"]
    assert main(["prepare-data", str(chats), "--out", str(tmp_path / "x"), "--format", "sft", "--dtype", "uint32"]) == 2
    assert "--dtype does not apply to --format sft" in capsys.readouterr().err


def test_sft_accumulation_weighs_micro_batches_by_trained_targets(tmp_path, sft_data):
    """Batch 8 in one pass and batch 4 accumulated twice see the same 8 windows (whose micro-batches
    hold different numbers of assistant targets) and take the same step: the loss is the mean over
    the global batch's trained targets, not the mean of micro-batch means."""
    root, anchor = sft_data
    loader = BatchLoader(SFTWindows(root / "train", SEQ), 4, seed=0)
    c1, c2 = (int(next(loader)["loss_mask"].sum()) for _ in range(2))
    assert c1 != c2  # otherwise the test could not tell the two weightings apart
    # AdamW's first step with eps far above |grad| moves each weight by about lr * grad / eps, so
    # the weights compare the gradients themselves (with the default eps it is about lr * sign).
    common = {"trainer.steps": 1, "optim.warmup_steps": 0, "optim.grad_clip": 0.0, "trainer.log_every": 1,
              "optim.lr": 10.0, "optim.eps": 10.0, "optim.weight_decay": 0.0, "optim.min_lr_ratio": 1.0}
    train(_cfg(tmp_path / "one", root, anchor, **common, **{"data.batch_size": 8}))
    train(_cfg(tmp_path / "two", root, anchor, **common, **{"data.batch_size": 4, "trainer.grad_accum": 2}))

    def step_loss(run):
        recs = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in recs if r.get("step") == 1 and "loss" in r)

    assert abs(step_loss("one") - step_loss("two")) < 1e-5
    _, sd0, _ = load_model_dir(anchor)
    _, sd1, _ = load_model_dir(tmp_path / "one" / "final")
    _, sd2, _ = load_model_dir(tmp_path / "two" / "final")
    moved = [k for k in sd1 if not torch.equal(sd1[k], sd0[k])]
    assert "embed.weight" in moved and "lm_head.weight" in moved
    for k in moved:
        d1, d2 = sd1[k] - sd0[k], sd2[k] - sd0[k]
        assert float((d1 - d2).norm()) <= 1e-3 * float(d1.norm()), k
