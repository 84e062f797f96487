"""DP-SGD: the accountant against opacus', per-sample clipping on real batches, noise only on
trainable coordinates, and a DP training run whose guarantee lands in the expert package."""

import json

import numpy as np
import pytest
import torch
from privhelpers import BYTE_TINY, make_byte_public, prepared_text, stdlib_text, train_private

from flexmoe.config.train import DataConfig, OptimConfig, RunConfig, StageConfig, TrainerConfig
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir
from flexmoe.data import TokenWindows
from flexmoe.flex.branch import branch
from flexmoe.train.freeze import PLANS, apply_freeze_plan
from flexmoe.flex.package import make_package
from flexmoe.train.privacy import (
    PrivacyConfig,
    calibrate_noise,
    clipped_sample_grads,
    epsilon_after,
    private_gradient,
    sample_loss,
    trainable_masks,
)

CFG = BYTE_TINY.replace(d_model=32, d_ff=64)


def _opacus_rdp(steps, sigma, q, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("steps,sigma,q,delta", [
    (1000, 1.0, 0.01, 1e-5),  # optimum at an integer order
    (300, 0.7, 0.05, 1e-5),  # optimum at a fractional order (the quadrature path)
    (40, 1.1, 0.25, 1e-3),
    (5000, 2.0, 0.004, 1e-6),
    (10, 1.0, 1.0, 1e-5),  # no subsampling: the plain Gaussian mechanism
])
def test_rdp_epsilon_matches_opacus(steps, sigma, q, delta):
    pytest.importorskip("opacus")
    ours, theirs = epsilon_after(steps, sigma, q, delta), _opacus_rdp(steps, sigma, q, delta)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 0.1 < ours < 100  # the settings span real budgets, not degenerate ones


def test_epsilon_grows_with_steps_and_falls_with_noise():
    e = [epsilon_after(n, 1.0, 0.02, 1e-5) for n in (10, 100, 1000)]
    assert e[0] < e[1] < e[2]
    assert epsilon_after(100, 2.0, 0.02, 1e-5) < e[1] / 2
    sigma = calibrate_noise(3.0, 1e-5, 0.02, 500)
    assert epsilon_after(500, sigma, 0.02, 1e-5) <= 3.0 < epsilon_after(500, sigma * 0.99, 0.02, 1e-5)


def test_prv_accountant_is_opacus_and_tighter():
    pytest.importorskip("opacus")
    rdp, prv = epsilon_after(200, 1.0, 0.02, 1e-5), epsilon_after(200, 1.0, 0.02, 1e-5, accountant="prv")
    assert 0.5 * rdp < prv < rdp  # PRV accounting is tighter than the RDP bound, and of the same order


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    public = make_byte_public(root, CFG)
    # No owner router embedding: it would be a mean of the owner's data released without noise.
    anchor = branch(public, root / "anchor")
    data = prepared_text(root, "code", stdlib_text(40_000))
    return root, public, anchor, data


def _anchor_model(anchor):
    model, _, _ = load_model(anchor)
    apply_freeze_plan(model, PLANS["expert_anchor"])
    return model


def test_per_sample_clipping_on_real_batches(owner):
    _, _, anchor, data = owner
    model = _anchor_model(anchor)
    windows = TokenWindows(data, 48)
    batch = torch.from_numpy(windows.windows(np.arange(0, 120, 10)))  # 12 windows of stdlib source
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    masks = trainable_masks(params)
    assert sum(m is not None for m in masks) == CFG.num_layers  # one router per layer has a frozen row

    raw = list(clipped_sample_grads(model, batch, params, float("inf"), masks))
    norms = np.array([n for _, n, _ in raw])
    clip = float(np.median(norms))  # half the windows must be clipped
    clipped = list(clipped_sample_grads(model, batch, params, clip, masks))
    after = np.array([float(torch.sqrt(sum(g.double().pow(2).sum() for g in gs))) for gs, _, _ in clipped])
    assert (after <= clip * (1 + 1e-6)).all()
    assert (norms > clip).sum() >= 5  # clipping really acted
    np.testing.assert_allclose(after[norms <= clip], norms[norms <= clip], rtol=1e-6)  # small ones untouched

    # The per-sample gradients are the real ones: they add up to the gradient of the summed loss.
    total = sum(sample_loss(model, batch[b:b + 1]) for b in range(batch.shape[0]))
    ref = torch.autograd.grad(total, params)
    for name, r, *per in zip(names, ref, *[gs for gs, _, _ in raw]):
        torch.testing.assert_close(sum(per), r, atol=1e-5, rtol=1e-4, msg=name)
        if "router" in name:
            assert all(float(g[0].abs().max()) == 0 for g in per)  # the anchor's router row takes nothing


def test_noise_only_on_trainable_coordinates(owner):
    _, _, anchor, _ = owner
    model = _anchor_model(anchor)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    empty = torch.zeros(0, 49, dtype=torch.long)  # a Poisson batch can be empty: the update is pure noise
    grads, stats = private_gradient(model, empty, params, max_grad_norm=0.5, noise_multiplier=2.0,
                                    expected_batch_size=4.0, generator=torch.Generator().manual_seed(0),
                                    masks=trainable_masks(params))
    assert stats["batch_size"] == 0
    noise = torch.cat([g.flatten() for n, g in zip(names, grads) if "experts" in n])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02)
    for n, g in zip(names, grads):
        if "router" in n:
            assert float(g[0].abs().max()) == 0 and float(g[1].abs().max()) > 0


def _run_config(root, anchor, data, steps, out):
    return RunConfig(out_dir=str(root / out), init_from=str(anchor),
                     data=DataConfig(train={"code": str(data)}, val={"code": str(data)}, seq_len=48, batch_size=8),
                     stage=StageConfig(name="expert_anchor", freeze="expert_anchor"),
                     optim=OptimConfig(lr=1e-3, warmup_steps=0), trainer=TrainerConfig(steps=steps, log_every=2,
                                                                                       eval_batches=1))


def test_dp_training_reports_opacus_epsilon_and_packages_it(owner, capfd):
    pytest.importorskip("opacus")
    root, public, anchor, data = owner
    num_windows = len(TokenWindows(data, 48))
    q = 8 / num_windows
    # A target reached after 5 of the 12 steps asked: training must stop there.
    target = (epsilon_after(5, 1.0, q, 1e-4) + epsilon_after(6, 1.0, q, 1e-4)) / 2
    pc = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4, target_epsilon=target,
                       noise_seed=0)
    result = train_private(_run_config(root, anchor, data, 12, "dp-run"), pc)
    dp = result["dp"]
    assert dp["steps"] == 5 and dp["steps_asked"] == 12
    assert dp["epsilon"] <= target < epsilon_after(6, 1.0, q, 1e-4)
    assert dp["sampling_rate"] == pytest.approx(q)
    assert dp["epsilon"] == pytest.approx(_opacus_rdp(5, 1.0, q, 1e-4), rel=0.01)
    assert result["shared_unchanged"] is True  # DP touched only the expert and its router row

    _, before, _ = load_model_dir(anchor)
    _, after, meta = load_model_dir(result["final"])
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(".ffn.experts." in k or ".ffn.router." in k for k in moved)
    for i in range(CFG.num_layers):
        assert torch.equal(after[f"layers.{i}.ffn.experts.up_proj"][0], before[f"layers.{i}.ffn.experts.up_proj"][0])
        assert torch.equal(after[f"layers.{i}.ffn.router.weight"][0], before[f"layers.{i}.ffn.router.weight"][0])
    lines = [json.loads(x) for x in (root / "dp-run" / "metrics.jsonl").read_text().splitlines()]
    eps_log = [r["epsilon"] for r in lines if "epsilon" in r]
    assert eps_log == sorted(eps_log) and len(eps_log) >= 3  # epsilon reported as training goes

    pkg = make_package(result["final"], root / "pkg-dp", owner="acme", domain="code", allowed_uses=["research"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sampling_rate", "steps"):
        assert manifest["dp"][key] == dp[key], key
    assert manifest["consent"] == {"allowed_uses": ["research"], "expires": None}

    # merge prints every expert's privacy record
    from flexmoe.flex.merge import merge

    capfd.readouterr()
    merge(public, [pkg], root / "merged-dp", routing="topk")
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "privacy: slot 1 acme/code" in x)
    assert f"DP-SGD epsilon {dp['epsilon']:.3g} at delta 0.0001" in line and "rdp accountant" in line, err


@pytest.mark.parametrize("change,match", [
    (dict(delta=0.5), "privacy.delta"),
    (dict(noise_multiplier=0.0), "noise_multiplier=0"),
    (dict(accountant="moments"), "privacy.accountant"),
])
def test_refusals_name_the_setting(owner, change, match):
    root, _, anchor, data = owner
    with pytest.raises(ValueError, match=match):
        train_private(_run_config(root, anchor, data, 2, "refused"), PrivacyConfig(enabled=True, **change))


def test_public_mix_refused(owner):
    root, _, anchor, data = owner
    cfg = _run_config(root, anchor, data, 2, "refused-mix")
    cfg.stage.public_mix = 0.25
    with pytest.raises(ValueError, match="stage.public_mix"):
        train_private(cfg, PrivacyConfig(enabled=True))


def test_settings_from_a_hydra_node():
    from omegaconf import OmegaConf

    from flexmoe.train.privacy import privacy_config_of

    class Run:
        privacy = OmegaConf.merge(OmegaConf.structured(PrivacyConfig), {"enabled": True, "target_epsilon": 8.0})

    pc = privacy_config_of(Run())
    assert pc.enabled and pc.target_epsilon == 8.0 and pc.noise_seed is None
    Run.privacy = OmegaConf.create({"enabled": True, "epsilon": 8.0})
    with pytest.raises(ValueError, match="unknown settings \\['epsilon'\\]"):
        privacy_config_of(Run())


def test_nonprivate_router_embedding_refused_or_recorded(owner):
    root, public, _, data = owner
    rows = torch.randn(CFG.num_layers, CFG.d_model)  # stands in for `flexmoe router-embed` on the owner's data
    anchor = branch(public, root / "anchor-embedded", rows)
    with pytest.raises(ValueError, match="router embedding.*without noise"):
        train_private(_run_config(root, anchor, data, 1, "refused-rows"), PrivacyConfig(enabled=True))
    pc = PrivacyConfig(enabled=True, noise_seed=0, allow_nonprivate_router_init=True)
    dp = train_private(_run_config(root, anchor, data, 1, "allowed-rows"), pc)["dp"]
    assert len(dp["excludes"]) == CFG.num_layers + 1 and "domain_centroids" in dp["excludes"][-1]


def test_flexmoe_train_routes_privacy_enabled_to_dp_sgd(owner):
    """`flexmoe train privacy.enabled=true ...` composes through Hydra and trains with DP-SGD."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from flexmoe.config.store import register
    from flexmoe.train.trainer import train

    root, _, anchor, data = owner
    conf = Path(__file__).resolve().parents[2] / "conf"
    register()
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="train", overrides=[
            f"out_dir={root / 'dp-hydra'}", f"init_from={anchor}", "stage=expert_anchor", "stage.public_mix=0",
            f"+data.train.code={data}", "data.seq_len=48", "data.batch_size=8", "trainer.steps=3",
            "trainer.log_every=1", "trainer.eval_batches=1", "privacy.enabled=true", "privacy.noise_multiplier=1.5",
            "privacy.delta=1e-4", "privacy.noise_seed=0"])
    result = train(cfg)
    q = 8 / len(TokenWindows(data, 48))
    assert result["dp"]["steps"] == 3 and result["dp"]["noise_multiplier"] == 1.5
    assert result["dp"]["epsilon"] == pytest.approx(epsilon_after(3, 1.5, q, 1e-4), rel=1e-9)
    assert result["shared_unchanged"] is True
    lines = [json.loads(x) for x in (root / "dp-hydra" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "epsilon" in r] == [1, 2, 3]  # epsilon reported as training goes


def test_sft_format_refused(owner):
    root, _, anchor, data = owner
    cfg = _run_config(root, anchor, data, 2, "refused-sft")
    cfg.data.format = "sft"
    with pytest.raises(ValueError, match="data.format=sft"):
        train_private(cfg, PrivacyConfig(enabled=True))
