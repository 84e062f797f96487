"""Expert packages and the public model as `flexmoe merge` inputs (issue 13): every malformed or
forged input is refused with exit code 2, one line naming the file (and field) at fault, no
traceback, and nothing at the destination. Also: consent recorded by `flexmoe package`, and
matched exactly.

Each case copies one valid package (or the public model) built once per module, applies one
mutation (rewriting sha256s where a forger would), and runs `flexmoe merge` in-process.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from security_harness import assert_refused, snapshot
from pkgworld import (CONFIG, MANIFEST, META, PKG_FILE, WEIGHTS, build_world, copy, edit_json, edit_model_tensors,
                      edit_package_tensors, rehash_model, rehash_package, write_pickle_bomb)

from flexmoe.io.keys import package_bias_key, package_router_key, package_weight_key


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("pkg-inputs"))


def _manifest(fn):
    """A mutation of the manifest object (in place)."""
    return lambda pkg, w: edit_json(pkg / MANIFEST, fn)


def _tensors(fn):
    """A mutation of the package's tensors, with the manifest's sha256 rewritten."""
    return lambda pkg, w: edit_package_tensors(pkg, fn)


def _consent(fn):
    return _manifest(lambda m: fn(m["consent"]))


def _symlink_expert(pkg, w):
    outside = pkg.parent / "elsewhere.safetensors"
    (pkg / PKG_FILE).rename(outside)  # same bytes, so the sha256 still matches
    (pkg / PKG_FILE).symlink_to(outside)


def _symlink_manifest(pkg, w):
    outside = pkg.parent / "manifest-elsewhere.json"
    (pkg / MANIFEST).rename(outside)
    (pkg / MANIFEST).symlink_to(outside)


def _list_outside(name):
    """The manifest also lists a file outside the package (with that file's true sha256)."""
    def mutate(pkg, w):
        edit_json(pkg / MANIFEST, lambda m: m["files"].__setitem__(name.format(math=w["pkg-math"]),
                                                                   m["files"][PKG_FILE]))
    return mutate


def _pickle_expert(pkg, w):
    # The sha256 is rewritten so the bytes reach the reader: only "never unpickle" stops it.
    write_pickle_bomb(pkg / PKG_FILE, pkg.parent / "canary")
    rehash_package(pkg)


def _truncate_expert(pkg, w):
    (pkg / PKG_FILE).write_bytes((pkg / PKG_FILE).read_bytes()[:100])
    rehash_package(pkg)


def _add(key, value):
    return _tensors(lambda t: t.__setitem__(key, value))


def _set_value(key, index, value):
    def fn(t):
        t[key].view(-1)[index] = value
    return _tensors(fn)


W0, R1, B0 = package_weight_key(0, "up_proj"), package_router_key(1), package_bias_key(0)

# id: (mutation of a copy of pkg-code, file it must name (relative to the package), text the line must hold)
PACKAGE_CASES = {
    # issue 13, unsafe 1: a tampered expert with a manifest that lists no files
    "files-empty-tampered": (lambda p, w: (_set_value(W0, 0, 1.5)(p, w), edit_json(p / MANIFEST, lambda m: m.update(files={}))),
                             MANIFEST, PKG_FILE),
    "files-list-other-name": (_manifest(lambda m: m.update(files={"notes.txt": m["files"][PKG_FILE]})), MANIFEST, "files"),
    "expert-bytes-changed": (lambda p, w: (p / PKG_FILE).write_bytes((p / PKG_FILE).read_bytes()[:-4] + b"\0\0\0\1"),
                             PKG_FILE, "sha256"),
    "format-version-9": (_manifest(lambda m: m.update(format="flexmoe-expert-package/9")), MANIFEST, "format"),
    "format-missing": (_manifest(lambda m: m.pop("format")), MANIFEST, "format"),
    "owner-missing": (_manifest(lambda m: m.pop("owner")), MANIFEST, "owner"),
    "owner-int": (_manifest(lambda m: m.update(owner=7)), MANIFEST, "owner"),
    "domain-list": (_manifest(lambda m: m.update(domain=["code"])), MANIFEST, "domain"),
    "shape-list": (_manifest(lambda m: m.update(shape=[2, 32, 48])), MANIFEST, "shape"),
    "shape-dmodel-string": (_manifest(lambda m: m["shape"].update(d_model="32")), MANIFEST, "shape.d_model"),
    "shape-layers-zero": (_manifest(lambda m: m["shape"].update(num_layers=0)), MANIFEST, "shape.num_layers"),
    "files-list": (_manifest(lambda m: m.update(files=[PKG_FILE])), MANIFEST, "files"),
    "files-digest-not-hex": (_manifest(lambda m: m["files"].update({PKG_FILE: "abc"})), MANIFEST, PKG_FILE),
    "tokens-seen-string": (_manifest(lambda m: m.update(tokens_seen="1000")), MANIFEST, "tokens_seen"),
    "tokens-seen-negative": (_manifest(lambda m: m.update(tokens_seen=-5)), MANIFEST, "tokens_seen"),
    "router-bias-flag-string": (_manifest(lambda m: m.update(router_bias="no")), MANIFEST, "router_bias"),
    "base-fingerprint-not-hex": (_manifest(lambda m: m.update(base_fingerprint="public-v1")), MANIFEST, "base_fingerprint"),
    "unknown-field": (_manifest(lambda m: m.update(run_after_merge="curl evil")), MANIFEST, "run_after_merge"),
    "manifest-not-json": (lambda p, w: (p / MANIFEST).write_text("{'owner': 'x'"), MANIFEST, "JSON"),
    "manifest-is-list": (lambda p, w: (p / MANIFEST).write_text("[]"), MANIFEST, "object"),
    "manifest-missing": (lambda p, w: (p / MANIFEST).unlink(), MANIFEST, "missing"),
    "dp-incomplete": (_manifest(lambda m: m.update(dp={"epsilon": 1.0})), MANIFEST, "dp"),
    "dp-epsilon-nan": (_manifest(lambda m: m.update(dp={k: 1.0 for k in ("epsilon", "delta", "noise_multiplier",
                                                                          "max_grad_norm", "sampling_rate", "steps")}
                                                    | {"epsilon": math.nan})), MANIFEST, "dp.epsilon"),
    # issue 13, unsafe 2: consent records are exact
    "consent-uses-string": (_consent(lambda c: c.update(allowed_uses="noncommercial")), MANIFEST, "allowed_uses"),
    "consent-use-unknown": (_consent(lambda c: c.update(allowed_uses=["commerce"])), MANIFEST, "allowed_uses"),
    "consent-uses-empty": (_consent(lambda c: c.update(allowed_uses=[])), MANIFEST, "allowed_uses"),
    "consent-uses-twice": (_consent(lambda c: c.update(allowed_uses=["research", "research"])), MANIFEST, "allowed_uses"),
    "consent-expires-words": (_consent(lambda c: c.update(expires="next year")), MANIFEST, "expires"),
    "consent-expires-no-such-day": (_consent(lambda c: c.update(expires="2030-02-30")), MANIFEST, "expires"),
    "consent-expires-compact": (_consent(lambda c: c.update(expires="20300101")), MANIFEST, "expires"),
    "consent-unknown-field": (_consent(lambda c: c.update(also="commercial")), MANIFEST, "consent.also"),
    "consent-is-string": (_manifest(lambda m: m.update(consent="research")), MANIFEST, "consent"),
    # reserved and unusable names
    "owner-public": (_manifest(lambda m: m.update(owner="public")), MANIFEST, "owner"),
    "domain-public": (_manifest(lambda m: m.update(domain="public")), MANIFEST, "domain"),
    "domain-Public": (_manifest(lambda m: m.update(domain="Public")), MANIFEST, "domain"),
    "domain-empty": (_manifest(lambda m: m.update(domain="")), MANIFEST, "domain"),
    "domain-comma": (_manifest(lambda m: m.update(domain="code,math")), MANIFEST, "domain"),
    "domain-is-other-owner": (_manifest(lambda m: m.update(domain="owner-math")), "", "owner-math"),
    # files that are not plain files of the package
    "files-dotdot": (_list_outside("../pkg-math/" + PKG_FILE), MANIFEST, "files"),
    "files-absolute": (_list_outside("{math}/" + PKG_FILE), MANIFEST, "files"),
    "files-subdir": (_list_outside("sub/" + PKG_FILE), MANIFEST, "files"),
    "expert-symlink-out": (_symlink_expert, MANIFEST, PKG_FILE),
    "manifest-symlink-out": (_symlink_manifest, MANIFEST, "plain file"),
    "unlisted-file": (lambda p, w: (p / "run.sh").write_text("rm -rf /\n"), "run.sh", "not listed"),
    "unlisted-dir": (lambda p, w: (p / "extra").mkdir(), "extra", "not listed"),
    # values: shapes, dtypes, finiteness, the tensor set
    "bias-wrong-shape": (_add(B0, torch.zeros(2)), PKG_FILE, B0),
    "bias-positive": (_add(B0, torch.full((1,), 5.0)), PKG_FILE, B0),
    "weight-nan": (_set_value(W0, 3, math.nan), PKG_FILE, W0),
    "router-inf": (_set_value(R1, 0, math.inf), PKG_FILE, R1),
    "weight-int32": (_tensors(lambda t: t.__setitem__(W0, t[W0].to(torch.int32))), PKG_FILE, W0),
    "weight-float64": (_tensors(lambda t: t.__setitem__(W0, t[W0].double())), PKG_FILE, W0),
    "weight-wrong-shape": (_tensors(lambda t: t.__setitem__(W0, t[W0][:, :-1].contiguous())), PKG_FILE, W0),
    "tensor-missing": (_tensors(lambda t: t.pop(R1)), PKG_FILE, R1),
    "tensor-unexpected": (_add("payload", torch.zeros(4)), PKG_FILE, "payload"),
    "embedding-wrong-shape": (_add("domain_embedding", torch.zeros(5)), PKG_FILE, "domain_embedding"),
    "manifest-shape-more-layers": (_manifest(lambda m: m["shape"].update(num_layers=3)), PKG_FILE, "layers"),
    "expert-truncated": (_truncate_expert, PKG_FILE, "safetensors"),
    "expert-is-pickle": (_pickle_expert, PKG_FILE, "safetensors"),
}


@pytest.mark.parametrize("case", list(PACKAGE_CASES))
def test_malformed_package_is_refused(case, w, tmp_path, run_cli):
    mutate, where, text = PACKAGE_CASES[case]
    pkg = copy(w["pkg-code"], tmp_path / "pkg-code")
    mutate(pkg, w)
    out = tmp_path / "out"
    r = run_cli(["merge", w["public"], pkg, w["pkg-math"], "--out", out])
    assert_refused(r, str(pkg / where) if where else str(pkg), out)
    assert text in r.last_line, r.last_line
    assert not (tmp_path / "canary").exists(), "a pickle was executed"


def test_valid_inputs_merge(w, tmp_path, run_cli):
    """The baseline every case above mutates merges, and records the package's sha256."""
    pkg = copy(w["pkg-code"], tmp_path / "pkg-code")
    r = run_cli(["merge", w["public"], pkg, w["pkg-math"], "--out", tmp_path / "out"])
    assert r.rc == 0, r.err
    experts = json.loads((tmp_path / "out" / META).read_text())["experts"]
    assert all(len(e["package_sha256"]) == 64 for e in experts[1:])


def test_duplicate_domain_is_refused(w, tmp_path, run_cli):
    twin = copy(w["pkg-code"], tmp_path / "twin")
    r = run_cli(["merge", w["public"], w["pkg-code"], twin, "--out", tmp_path / "out"])
    assert_refused(r, str(twin), tmp_path / "out")


# --- the public model ----------------------------------------------------------------------------

def _corrupt_public(p):
    edit_model_tensors(p, lambda sd: sd["norm.weight"].add_(0.5))


def _unlisted_router(p):
    edit_json(p / META, lambda m: m["files"].pop("router_public.safetensors"))


PUBLIC_CASES = {
    "meta-missing": (lambda p: (p / META).unlink(), META, "missing"),
    "meta-not-object": (lambda p: (p / META).write_text('"public"'), META, "object"),
    "meta-format-9": (lambda p: edit_json(p / META, lambda m: m.update(format="flexmoe-model/9")), META, "format"),
    "meta-kind-int": (lambda p: edit_json(p / META, lambda m: m.update(kind=1)), META, "kind"),
    "files-lack-weights": (lambda p: edit_json(p / META, lambda m: m["files"].pop(WEIGHTS)), META, WEIGHTS),
    "files-empty": (lambda p: edit_json(p / META, lambda m: m.update(files={})), META, "files"),
    "router-file-unhashed": (_unlisted_router, META, "router_public"),
    "router-file-outside": (lambda p: edit_json(p / META, lambda m: m["router_embedding"].update(
        router_public="../pkg-math/expert.safetensors")), META, "router_public"),
    # issue 13: a corrupted public model is blamed on the public model, not on the package
    "weights-corrupted-rehashed": (_corrupt_public, "", "fingerprint"),
    "fingerprint-dropped": (lambda p: (_corrupt_public(p), edit_json(p / META, lambda m: m.pop("fingerprint"))),
                            META, "fingerprint"),
    "weights-corrupted": (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-2] + b"\x01\x02"),
                          WEIGHTS, "sha256"),
    "weights-symlink": (lambda p: ((p / WEIGHTS).rename(p.parent / "w.safetensors"),
                                   (p / WEIGHTS).symlink_to(p.parent / "w.safetensors")), WEIGHTS, "link"),
    "config-wrong-type": (lambda p: (edit_json(p / CONFIG, lambda c: c.update(d_model="32")), rehash_model(p)),
                          CONFIG, ""),
}


@pytest.mark.parametrize("case", list(PUBLIC_CASES))
def test_malformed_public_model_is_refused(case, w, tmp_path, run_cli):
    mutate, where, text = PUBLIC_CASES[case]
    public = copy(w["public"], tmp_path / "public")
    mutate(public)
    out = tmp_path / "out"
    r = run_cli(["merge", public, w["pkg-code"], "--out", out])
    assert_refused(r, str(public / where) if where else str(public), out)
    assert text in r.last_line, r.last_line


# --- outputs that overlap inputs -----------------------------------------------------------------

@pytest.mark.parametrize("target", ["in-package", "is-public", "in-public"])
def test_merge_out_overlapping_an_input_is_refused(target, w, tmp_path, run_cli):
    pkg, public = copy(w["pkg-code"], tmp_path / "pkg"), copy(w["public"], tmp_path / "public")
    out = {"in-package": pkg / "merged", "is-public": public, "in-public": public / "sub"}[target]
    before = snapshot(out)
    r = run_cli(["merge", public, pkg, "--out", out])
    assert_refused(r, ["--out", str(out)], out, before)
    assert snapshot(pkg) is not None and (pkg / MANIFEST).is_file()


def test_merge_into_a_non_empty_dir_names_no_missing_flag(w, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    r = run_cli(["merge", w["public"], w["pkg-code"], "--out", out])
    assert_refused(r, str(out), out, before)
    assert "overwrite" not in r.last_line  # merge has no such flag


# --- consent from the command line, matched exactly ---------------------------------------------

def test_package_cli_records_consent_and_refuses_bad_terms(w, tmp_path, run_cli):
    trained = w["root"] / "trained-code"
    ok = tmp_path / "pkg"
    r = run_cli(["package", trained, ok, "--owner", "acme", "--domain", "law", "--allowed-uses", "commercial,research",
                 "--expires", "2099-01-31"])
    assert r.rc == 0, r.err
    consent = json.loads((ok / MANIFEST).read_text())["consent"]
    assert consent == {"allowed_uses": ["commercial", "research"], "expires": "2099-01-31"}
    for extra, text in ((["--allowed-uses", "noncommercial"], "noncommercial"),
                        (["--allowed-uses", "research", "--expires", "31/12/2099"], "YYYY-MM-DD"),
                        (["--expires", "2099-01-31"], "allowed uses"),
                        (["--owner", "public"], "public")):
        bad = tmp_path / "bad"
        r = run_cli(["package", trained, bad, "--owner", "acme", "--domain", "law", *extra])
        assert_refused(r, text, bad)


def test_use_is_matched_exactly_and_an_unconsented_use_is_reported(w, tmp_path, run_cli):
    """A record naming 'noncommercial' as a string is refused above; a valid research-only record
    does not serve --use commercial, and a use no owner allows says so on stderr."""
    r = run_cli(["consent", w["merged"], "--use", "commercial", "--date", "2030-01-01", "--json"])
    assert r.rc == 0, r.err
    assert [e["active"] for e in json.loads(r.out)["experts"]] == [True, False, True]
    only_code = w["root"] / "merged-code"  # code consents to research only
    r = run_cli(["generate", only_code, "--prompt", "0123", "--max-new-tokens", "2", "--use", "commercial",
                 "--tokenizer", "bytes", "--json"])
    assert r.rc == 0, r.err
    assert json.loads(r.out)["active_experts"] == [True, False]
    assert "use=commercial: no owner's expert consents" in r.err


def test_no_verify_is_said_on_stderr(w, tmp_path, run_cli):
    r = run_cli(["merge", w["public"], w["pkg-code"], "--out", tmp_path / "out", "--no-verify"])
    assert r.rc == 0, r.err
    assert "--no-verify" in r.err and str(w["pkg-code"]) in r.err
    assert not os.path.exists(tmp_path / "canary")
