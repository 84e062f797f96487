"""SFT under data parallelism: 2 FSDP (or DeepSpeed ZeRO-2) ranks with 4 windows each take the same step as one process
with all 8, although the ranks' windows hold different numbers of trained (assistant) targets:
the loss is the mean over the global batch's trained targets, not the mean of per-rank means."""

import json

import pytest
import torch

from disthelpers import run_distributed
from flexmoe.io.model_dir import load_model_dir
from flexmoe.data import BatchLoader, ByteTokenizer
from flexmoe.data.chat_corpora import arithmetic_chats
from flexmoe.data.sft import SFTWindows, prepare_sft
from parhelpers import losses, run_cfg, train_on_rank

SEQ = 64


@pytest.mark.parametrize("parallel", [{"dp_shard": -1}, {"engine": "deepspeed", "zero_stage": 2}],
                         ids=["fsdp", "zero2"])
def test_sft_data_parallel_weighs_ranks_by_trained_targets(pdata, tmp_path, parallel):
    if parallel.get("engine") == "deepspeed":
        pytest.importorskip("deepspeed")
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in arithmetic_chats(300, seed=0)))
    prepare_sft([src], tmp_path / "sft", ByteTokenizer())
    first = next(BatchLoader(SFTWindows(tmp_path / "sft", SEQ), 8, seed=0))["loss_mask"]
    assert int(first[:4].sum()) != int(first[4:].sum())  # the two ranks' halves differ

    def cfg(out, world, **parallel):
        c = run_cfg(pdata, out, world=world, steps=1, seq_len=SEQ, **parallel)
        c["data"].update(format="sft", train={"math": str(tmp_path / "sft")})
        # AdamW's first step with eps far above |grad| moves each weight by about lr * grad / eps:
        # the weights then compare the gradients themselves.
        c["optim"].update(lr=10.0, eps=10.0, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0)
        return c

    run_distributed(train_on_rank, 1, [cfg(tmp_path / "one", 1)])
    run_distributed(train_on_rank, 2, [cfg(tmp_path / "two", 2, **parallel)])
    assert abs(losses(tmp_path / "one")[1] - losses(tmp_path / "two")[1]) < 1e-5
    _, sd0, _ = load_model_dir(pdata["init"])
    _, sd1, _ = load_model_dir(tmp_path / "one" / "final")
    _, sd2, _ = load_model_dir(tmp_path / "two" / "final")
    moved = [k for k in sd1 if not torch.equal(sd1[k], sd0[k])]
    assert "embed.weight" in moved
    for k in moved:
        d1, d2 = sd1[k] - sd0[k], sd2[k] - sd0[k]
        assert float((d1 - d2).norm()) <= 1e-3 * float(d1.norm()), k
