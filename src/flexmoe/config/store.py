"""Register the schemas with Hydra's ConfigStore so YAML is validated against the dataclasses."""

from hydra.core.config_store import ConfigStore

from flexmoe.config.train import RunConfig


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
