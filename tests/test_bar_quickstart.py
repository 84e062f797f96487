"""`flexmoe quickstart recipe=bar` at toy size: every step runs, the report has every model on
every domain with finite masked losses, and the sft expert ships its shared tensors."""

import json
import math

import pytest

from flexmoe.recipes.bar import BarConfig
from flexmoe.recipes import quickstart_main


def test_bar_quickstart_small(tmp_path):
    report = quickstart_main([
        "recipe=bar", f"out_dir={tmp_path}", "public_steps=8", "sft_steps=6", "router_tune_steps=3",
        "n_math=240", "n_code=60", "max_bytes_per_domain=60000", "seq_len=64", "batch_size=4", "eval_windows=8"])
    on_disk = json.loads((tmp_path / "bar_report.json").read_text())
    assert on_disk["val_loss"] == report["val_loss"] and on_disk["domains"] == ["math", "code"]
    rows = {"public", "merged/sft+shared=average", "merged/sft+shared=public", "merged/frozen",
            "merged/sft+shared=average+router_tune", "merged/sft+shared=average[topk]", "merged/frozen[topk]"} | {
        f"expert-{v}/{d}" for v in ("sft", "frozen") for d in ("math", "code")}
    assert set(report["val_loss"]) == rows
    for row in rows:
        for d in ("math", "code"):
            v = report["val_loss"][row][d]
            assert math.isfinite(v) and 0 < v < 10, (row, d, v)
    assert set(report["sft_beats_frozen"]) == {"math", "code"}
    assert set(report["router_tune_mean_val_loss"]) == {"merged/sft+shared=average",
                                                         "merged/sft+shared=average+router_tune"}
    assert report["router_tune_moved_only_routers"] is True  # experts and shared tensors bit-identical
    # the two variants are different trainings from the same anchor
    assert report["val_loss"]["expert-sft/math"] != report["val_loss"]["expert-frozen/math"]
    # shared=average differs from shared=public only because sft packages carry trained shared tensors
    assert report["val_loss"]["merged/sft+shared=average"] != report["val_loss"]["merged/sft+shared=public"]
    sft_pkg = json.loads((tmp_path / "owners" / "math" / "package-sft" / "manifest.json").read_text())
    frozen_pkg = json.loads((tmp_path / "owners" / "math" / "package-frozen" / "manifest.json").read_text())
    assert "embed.weight" in sft_pkg["shared"] and not frozen_pkg.get("shared")
    # every owner's package carries the n-gram profile of its own chats: the merges route by document
    assert report["routing"] == "anchor_ngram"
    assert json.loads((tmp_path / "merged" / "frozen-public-topk" / "config.json").read_text()).get("routing", "topk") == "topk"
    assert report["val_loss"]["merged/frozen"] != report["val_loss"]["merged/frozen[topk]"]
    assert set(report["frozen_merge_bounds"]) == {"math", "code"}
    md = (tmp_path / "bar_report.md").read_text()
    assert "| expert-sft/code |" in md and "Wall time" in md


def test_bar_settings_are_checked():
    with pytest.raises(ValueError, match="nosuch"):
        BarConfig.from_overrides(["nosuch=1"])
    with pytest.raises(ValueError, match="domains"):
        BarConfig.from_overrides(["domains=math,legal"])
    with pytest.raises(ValueError, match="recipe='bogus'"):
        quickstart_main(["recipe=bogus"])
