"""The Hydra config tree: every model preset builds, dry runs count the published layouts right."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flexmoe.config.model import ModelConfig
from flexmoe.config.store import register
from flexmoe.model import Transformer
from flexmoe.model.flops import param_counts
from flexmoe.train.dry_run import dry_run

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _compose(overrides):
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_builds(preset):
    cfg = _compose([f"model={preset}"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    with torch.device("meta"):
        model = Transformer(mcfg)
    assert model.num_params() == param_counts(mcfg).total


@pytest.mark.parametrize("preset,overrides,total,active", [
    ("flexolmo_7x7b", [], 33.3e9, 24.6e9),
    ("flexolmo_8x7b_top4", [], 37.6e9, 20.3e9),
    ("olmo2_7b", [], 7.30e9, 7.30e9),
])
def test_dry_run_counts_published_layouts(preset, overrides, total, active):
    cfg = _compose([f"model={preset}", *overrides])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    info = dry_run(cfg, mcfg)
    assert abs(info["params_total"] / total - 1) < 0.01, info["params_total"]
    assert abs(info["params_active"] / active - 1) < 0.01, info["params_active"]
    assert info["flops_per_token"] > 6 * info["params_active"] * 0.9


def test_dry_run_anchor_stage_trains_one_expert():
    cfg = _compose(["model=flexolmo_2x7b", "stage=expert_anchor"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    info = dry_run(cfg, mcfg)
    expert = 32 * 3 * 4096 * 11008
    router_row = 32 * 4096  # the owner's row; the public row is masked, not counted
    assert info["params_trainable"] == expert + router_row
    full = dry_run(_compose(["model=flexolmo_2x7b"]), mcfg)
    # frozen weights carry no gradient or AdamW moments: optimizer memory scales with trainable params
    ratio = info["memory_per_device_gib"]["grads_and_optimizer"] / full["memory_per_device_gib"]["grads_and_optimizer"]
    assert abs(ratio - info["params_trainable"] / full["params_trainable"]) < 1e-9
    assert ratio < 0.4


def test_freeze_plan_names_match():
    from flexmoe.config.train import FREEZE_PLAN_NAMES
    from flexmoe.train.freeze import PLANS

    assert sorted(FREEZE_PLAN_NAMES) == sorted(PLANS)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    assert cfg.stage.freeze == "expert_anchor"
    if mcfg.num_experts == 2:  # the full-size recipe: one 7B expert trains, the rest is frozen
        info = dry_run(cfg, mcfg)
        assert info["params_trainable"] == 32 * (3 * 4096 * 11008 + 4096)


def test_dry_run_memory_divides_by_the_shard_degree(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = _compose(["model=flexolmo_2x7b", "parallel=fsdp"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    sharded = dry_run(cfg, mcfg)["memory_per_device_gib"]["weights"]
    single = dry_run(_compose(["model=flexolmo_2x7b"]), mcfg)["memory_per_device_gib"]["weights"]
    assert cfg.parallel.dp_shard == -1 and abs(sharded * 8 / single - 1) < 1e-9


def test_config_json_leaves_unused_features_out_for_older_readers(tmp_path):
    """A model that does not use a newer feature saves no key for it (an older flexmoe refuses
    unknown keys); one that uses it keeps the key; both load back equal."""
    import dataclasses
    import json

    from flexmoe.config.model import FEATURE_DEFAULTS

    for f in dataclasses.fields(ModelConfig):
        if f.name in FEATURE_DEFAULTS:
            assert f.default == FEATURE_DEFAULTS[f.name], f.name
    plain = ModelConfig(num_experts=4)
    plain.save(tmp_path / "a.json")
    assert not set(json.loads((tmp_path / "a.json").read_text())) & set(FEATURE_DEFAULTS)
    assert ModelConfig.load(tmp_path / "a.json") == plain
    used = ModelConfig(num_experts=4, routing="anchor_ngram", doc_ngram_buckets=64, router_cosine_temp=0.1)
    used.save(tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["routing"] == "anchor_ngram"
    assert ModelConfig.load(tmp_path / "b.json") == used
    (tmp_path / "c.json").write_text(json.dumps(dict(plain.to_dict(), future_field=1)))
    with pytest.raises(ValueError, match="c.json.*future_field.*newer flexmoe"):
        ModelConfig.load(tmp_path / "c.json")
