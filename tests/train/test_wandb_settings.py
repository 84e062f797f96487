"""wandb settings: the environment's WANDB_MODE is honoured unless the config names a mode."""

from __future__ import annotations

import pytest

from flexmoe.config.train import WandbConfig
from flexmoe.train.metrics import wandb_settings


def test_env_mode_is_honoured_when_the_config_names_none(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_settings(WandbConfig(enabled=True))["mode"] == "disabled"
    assert wandb_settings(WandbConfig(enabled=True, mode="online"))["mode"] == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_settings(WandbConfig(enabled=True))["mode"] == "offline"


def test_entity_group_tags_reach_wandb_init():
    s = wandb_settings(WandbConfig(enabled=True, entity="lab", group="sweep-1", tags=["math", "7b"]))
    assert (s["entity"], s["group"], s["tags"]) == ("lab", "sweep-1", ["math", "7b"])


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="wandb.mode='cloud'"):
        wandb_settings(WandbConfig(enabled=True, mode="cloud"))
