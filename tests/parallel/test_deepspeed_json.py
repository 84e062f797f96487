"""DeepSpeed JSON written for the Hugging Face Trainer works as it is ("auto" values, AdamW blocks)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from flexmoe.config.train import RunConfig
from flexmoe.parallel.deepspeed import deepspeed_config

HF_TRAINER_JSON = {
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"},
}


def _cfg(tmp_path, content, **over):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(content))
    cfg = OmegaConf.structured(RunConfig)
    cfg.parallel.engine, cfg.parallel.deepspeed_config = "deepspeed", str(f)
    cfg.data.batch_size, cfg.trainer.grad_accum, cfg.trainer.dtype, cfg.model.d_model = 4, 2, "bf16", 64
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_hf_trainer_auto_values_take_ours(tmp_path):
    out = deepspeed_config(_cfg(tmp_path, HF_TRAINER_JSON), world_size=2)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (4, 2, 16)
    # trainer.dtype=bf16 is autocast over fp32 masters: DeepSpeed's bf16 mode (bf16 frozen tensors) stays off
    assert out["gradient_clipping"] == 1.0 and out["bf16"] == {"enabled": False} and out["fp16"] == {"enabled": False}
    z = out["zero_optimization"]
    assert (z["stage"], z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) \
        == (3, 64 * 64, int(0.9 * 64 * 64), 640)
    assert "optimizer" not in out and "scheduler" not in out and z["overlap_comm"] is True


@pytest.mark.parametrize("change,needle", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}}, "optim.lr"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, "optim.beta1/optim.beta2"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, "remove 'scheduler'"),
    ({"fp16": {"enabled": True}}, "trainer.dtype=bf16"),
    ({"bf16": {"enabled": True}, "_dtype": "fp32"}, "set trainer.dtype=bf16"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "zero_optimization.sub_group_size"),
])
def test_what_has_no_flexmoe_meaning_is_refused_naming_the_setting(tmp_path, change, needle):
    change = dict(change)
    over = {"trainer.dtype": change.pop("_dtype")} if "_dtype" in change else {}
    with pytest.raises(ValueError) as e:
        deepspeed_config(_cfg(tmp_path, {**HF_TRAINER_JSON, **change}, **over), world_size=2)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_optimizer_block_equal_to_ours_is_accepted(tmp_path):
    cfg = _cfg(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                                      "weight_decay": 0.1}}})
    assert "optimizer" not in deepspeed_config(cfg, world_size=1)
