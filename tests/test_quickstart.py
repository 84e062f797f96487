"""The quickstart end to end at toy size: every lifecycle step runs in its own process and the
report has every row, on every eval domain, with finite numbers."""

import importlib.util
import json
import math

from flexmoe.recipes.flexolmo import QuickstartConfig, run_quickstart


def test_quickstart_small(tmp_path):
    cfg = QuickstartConfig.from_overrides([
        f"out_dir={tmp_path}", "public_steps=30", "expert_steps=12", "max_bytes_per_domain=150000",
        "eval_windows=6", "seq_len=128", "batch_size=8"])
    res = run_quickstart(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_domains"] == ["public", "code", "legal", "math"]
    rows = {"public", "merged", "soup"} | {f"expert/{d}" for d in cfg.domains} | {
        f"merged-without/{d}" for d in cfg.domains}
    assert rows <= set(report["perplexity"])
    for row in rows:
        for d in report["eval_domains"]:
            v = report["perplexity"][row][d]
            assert math.isfinite(v) and 1.0 < v < 300.0, (row, d, v)
    assert report["seconds"] > 0 and res["seconds"] == report["seconds"]
    for shares in report["routing_shares"].values():
        assert abs(sum(shares) - 1.0) < 1e-6 and len(shares) == 4
    assert (tmp_path / "routing_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| merged-without/legal |" in md and "routing_heatmap.png" in md
    # each owner's package carries only its expert and the public fingerprint
    public_fp = json.loads((tmp_path / "public" / "final" / "flexmoe.json").read_text())["fingerprint"]
    for d in cfg.domains:
        m = json.loads((tmp_path / "owners" / d / "package" / "manifest.json").read_text())
        assert m["domain"] == d and m["base_fingerprint"] == public_fp and m["tokens_seen"] == 12 * 8 * 128
    # the merged model's opt-out rows are real: switching an expert off changes its own domain
    for d in cfg.domains:
        assert report["perplexity"][f"merged-without/{d}"][d] != report["perplexity"]["merged"][d]
    # the default merge routes by n-gram profile (every owner's router-embed made one)
    assert report["routing"] == "anchor_ngram"
    assert "merged[routing=topk]" in report["perplexity"]
    # the export-hf release run by transformers (trust_remote_code) computes the merged model
    if importlib.util.find_spec("transformers") is not None:
        for d, v in report["perplexity"]["merged"].items():
            assert math.isclose(report["perplexity"]["merged[hf-release]"][d], v, rel_tol=1e-5), d
    assert set(report["routing_quality"]["expert_ratio"]) == set(cfg.domains)
    # attribution per eval domain: shares over owners sum to 1, and opted-in owners get credit
    for d, row in report["attribution"].items():
        assert abs(sum(row.values()) - 1.0) < 1e-6, (d, row)
    assert report["attribution"]["math"]["owner-math"] > 0.2
    assert "## Attribution" in md and "## Routing quality" in md


def test_quickstart_with_a_dp_owner(tmp_path):
    """dp_owners=math: that owner trains under DP-SGD (document units) with a DP n-gram profile,
    the merge takes its DP package, and the report states its epsilon and what DP cost it against
    the same owner trained without DP (expert, merged model, routing)."""
    cfg = QuickstartConfig.from_overrides([
        f"out_dir={tmp_path}", "public_steps=20", "expert_steps=8", "max_bytes_per_domain=100000",
        "eval_windows=4", "seq_len=128", "batch_size=8", "domains=code,math", "dp_owners=math",
        "dp_epsilon=6", "dp_profile_epsilon=2"])
    run_quickstart(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    dp = report["privacy"]["math"]
    assert dp["dp"]["epsilon"] <= 6.0 and dp["dp"]["unit"].startswith("document") and dp["dp"]["steps"] == 8
    assert dp["profile_dp"]["epsilon"] == 2.0 and dp["privacy_total"]["epsilon"] == dp["dp"]["epsilon"] + 2.0
    for key in ("expert_ppl", "merged_ppl", "routed_to_own_expert"):
        assert all(math.isfinite(v) for v in dp[key].values()), key
    # the DP package is what was merged, and the report's expert row is the DP expert
    merged = json.loads((tmp_path / "merged" / "flexmoe.json").read_text())
    assert next(e for e in merged["experts"] if e["domain"] == "math")["dp"]["epsilon"] == dp["dp"]["epsilon"]
    assert report["perplexity"]["expert/math"]["math"] == dp["expert_ppl"]["dp"] != dp["expert_ppl"]["no_dp"]
    assert "## Differential privacy" in (tmp_path / "report.md").read_text()
