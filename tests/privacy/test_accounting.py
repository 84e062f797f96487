"""The accounting is opacus': the epsilon flexmoe reports (epsilon_after, the accountant a DP run
steps, the `dp` record of a trained expert) equals what opacus' accountant of the same name
reports for the same schedule (steps, noise multiplier, sampling rate, delta), for `rdp` and `prv`."""

import sys

import pytest
from privhelpers import BYTE_TINY, make_byte_public, prepared_text, stdlib_text, train_private

from flexmoe.config.train import DataConfig, OptimConfig, RunConfig, StageConfig, TrainerConfig
from flexmoe.data import TokenWindows
from flexmoe.flex.branch import branch
from flexmoe.train.privacy import (
    DEFAULT_ORDERS,
    PrivacyConfig,
    calibrate_noise,
    epsilon_after,
    make_accountant,
    privacy_config_of,
    require_opacus,
)

pytest.importorskip("opacus")

SCHEDULES = [  # (steps, sigma, q, delta)
    (1000, 1.0, 0.01, 1e-5),
    (300, 0.7, 0.05, 1e-5),
    (40, 1.1, 0.25, 1e-3),
    (3, 1.5, 0.02, 1e-4),
]


def _opacus_epsilon(name, steps, sigma, q, delta):
    from opacus.accountants import create_accountant

    acc = create_accountant(name)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def test_orders_are_opacus_defaults():
    from opacus.accountants import RDPAccountant

    assert list(DEFAULT_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("name", ["rdp", "prv"])
@pytest.mark.parametrize("steps,sigma,q,delta", SCHEDULES)
def test_epsilon_is_opacus(name, steps, sigma, q, delta):
    theirs = _opacus_epsilon(name, steps, sigma, q, delta)
    assert epsilon_after(steps, sigma, q, delta, accountant=name) == pytest.approx(theirs, rel=1e-12, abs=0)
    acc = make_accountant(name)  # stepped one at a time, as a DP run does
    for _ in range(steps):
        acc.step(sigma, q)
    assert acc.name == name and acc.epsilon(delta) == pytest.approx(theirs, rel=1e-12, abs=0)
    assert 0.1 < theirs < 100


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_calibration_is_opacus_and_lands_on_the_target(name):
    from opacus.accountants.utils import get_noise_multiplier

    sigma = calibrate_noise(3.0, 1e-5, 0.02, 500, accountant=name)
    assert sigma == get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500,
                                         accountant=name, epsilon_tolerance=1e-3 * 3.0)
    assert 2.997 <= epsilon_after(500, sigma, 0.02, 1e-5, name) <= 3.0


def test_without_opacus_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # `import opacus.accountants` now fails
    for call in (require_opacus, lambda: privacy_config_of(None, PrivacyConfig(enabled=True)),
                 lambda: make_accountant("rdp"), lambda: epsilon_after(3, 1.0, 0.1, 1e-5)):
        with pytest.raises(ValueError, match=r"needs opacus.*pip install -e '\.\[dp\]'") as e:
            call()
        assert "\n" not in str(e.value)
    assert privacy_config_of(None, PrivacyConfig(enabled=False)).enabled is False  # no DP, no opacus needed


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_trained_expert_reports_opacus_epsilon(tmp_path, name):
    cfg = BYTE_TINY.replace(d_model=32, d_ff=64, num_layers=1)
    public = make_byte_public(tmp_path, cfg)
    anchor = branch(public, tmp_path / "anchor")
    data = prepared_text(tmp_path, "code", stdlib_text(12_000))
    run = RunConfig(out_dir=str(tmp_path / "run"), init_from=str(anchor),
                    data=DataConfig(train={"code": str(data)}, val={"code": str(data)}, seq_len=48, batch_size=4),
                    stage=StageConfig(name="expert_anchor", freeze="expert_anchor", public_mix=0.0),
                    optim=OptimConfig(lr=1e-3, warmup_steps=0),
                    trainer=TrainerConfig(steps=3, log_every=1, eval_batches=1))
    pc = PrivacyConfig(enabled=True, noise_multiplier=1.3, delta=1e-3, accountant=name, noise_seed=0)
    dp = train_private(run, pc)["dp"]
    q = 4 / len(TokenWindows(data, 48))
    assert dp["accountant"] == name and dp["steps"] == 3 and dp["sampling_rate"] == pytest.approx(q, rel=1e-12)
    assert dp["epsilon"] == pytest.approx(_opacus_epsilon(name, 3, 1.3, dp["sampling_rate"], 1e-3), rel=1e-12, abs=0)
