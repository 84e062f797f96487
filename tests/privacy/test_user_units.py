"""Users as the privacy unit (issue 17, item 2): prepare-data --user-field writes dense per-document
user ids; UserUnits gives each user all their documents' windows, capped in all; the refusals are
one line and exit 2; book-keeping clipping equals the reference on user units; a DP run with
privacy.unit=user records its unit."""

import json

import numpy as np
import pytest
from privhelpers import BYTE_TINY, make_byte_public, stdlib_text, train_private
from test_document_units import check_book_keeping_on_units

from flexmoe.cli import main
from flexmoe.config.train import DataConfig, OptimConfig, RunConfig, StageConfig, TrainerConfig
from flexmoe.data import ByteTokenizer, TokenWindows, prepare_data
from flexmoe.data.errors import DataError
from flexmoe.data.units import DocumentUnits, UserUnits, open_units
from flexmoe.flex.branch import branch
from flexmoe.io.files import sha256_file
from flexmoe.train.privacy import PrivacyConfig

EOS, S, CAP = 256, 16, 4
# (user, document length in bytes), documents interleaved between users. Under seq_len 16 a
# document of n bytes (n targets with its eos) takes ceil(n / 16) windows, at most CAP.
# alice: 10 + 40 + 5 bytes -> 1 + 3 + 1 windows: the cap keeps 4, her third document is dropped
# bob: 100 bytes -> 7 windows, the cap (per document too) keeps 4; carol: 20 + 12 + 1 bytes ->
# 2 + 1 + 1 windows, exactly the cap; 7 (an integer id): 33 bytes, 3 windows. An empty record of
# carol's writes no document.
PLAN = [("alice", 10), ("bob", 100), ("alice", 40), ("carol", 20), (7, 33), ("carol", 0), ("alice", 5),
        ("carol", 12), ("carol", 1)]
TARGETS = sum(n for _, n in PLAN)  # 221: each document's bytes, its eos the last target
USERS = ["alice", "bob", "carol", "7"]  # dense ids: order of first appearance


def _texts():
    text, at, out = stdlib_text(2000), 0, []
    for _, n in PLAN:
        while n and text[at].isspace():  # each document starts with a visible byte: none is blank
            at += 1
        out.append(text[at:at + n])
        assert len(out[-1].encode()) == n and (n == 0 or out[-1].strip())
        at += n
    return out


def _write(path):
    path.write_text("".join(json.dumps({"text": t, "user": u}) + "\n" for (u, _), t in zip(PLAN, _texts())))
    return path


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "users"
    assert main(["prepare-data", str(_write(tmp_path / "in.jsonl")), "--out", str(out), "--user-field", "user"]) == 0
    return out


def test_prepare_data_writes_dense_user_ids(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["users"]["field"] == "user" and m["users"]["num_users"] == 4 and m["users"]["path"] == "user_ids.npy"
    ids = np.load(prepared / "user_ids.npy", allow_pickle=False)
    want = [USERS.index(str(u)) for u, n in PLAN if n > 0]  # the empty record wrote no document
    assert ids.dtype == np.int64 and ids.tolist() == want == [0, 1, 0, 2, 3, 0, 2, 2]
    assert m["num_documents"] == len(want)
    assert not [p for p in prepared.parent.iterdir() if ".tmp" in p.name]  # nothing half-written left beside it


def test_user_units_hold_each_users_documents_capped(prepared):
    units = UserUnits(TokenWindows(prepared, S), max_windows=CAP, pad_id=257)
    docs = DocumentUnits(TokenWindows(prepared, S), max_windows=CAP, pad_id=257)
    assert len(units) == 4 and units.user_of_unit.tolist() == [0, 1, 2, 3]
    picks = np.array([2, 0, 3, 1])  # any order: window j's unit is the position of its user in picks
    tokens, mask, unit = units.batch(picks)
    doc_user = np.load(prepared / "user_ids.npy")
    texts = [t for (_, n), t in zip(PLAN, _texts()) if n > 0]
    for j, u in enumerate(picks):
        rows = np.flatnonzero(unit == j)
        mine = np.flatnonzero(doc_user == u)
        # the user's windows are their documents' own windows (as DocumentUnits cuts them), in order
        d_tok, d_mask, _ = docs.batch(mine)
        assert len(rows) == min(CAP, len(d_tok))
        np.testing.assert_array_equal(tokens[rows], d_tok[:len(rows)])
        np.testing.assert_array_equal(mask[rows], d_mask[:len(rows)])
        # and independently: each window starts a document or continues the one before by one shared token
        first = tokens[rows[0], :int(mask[rows[0]].sum()) + 1]
        assert first.tolist() == (list(texts[mine[0]].encode()) + [EOS])[:S + 1]
    assert [int((unit == j).sum()) for j in range(4)] == [4, 4, 3, 4]  # carol, alice, 7, bob
    assert (tokens == 257).any()  # short windows padded
    # targets kept: alice 10 + 40 (her 5-byte document is past the cap), bob 4 x 16 of 100,
    # carol 20 + 12 + 1, 7: 33; the rest (alice's 5, bob's 36) dropped
    assert units.tokens_kept == 50 + 64 + 33 + 33 == 180
    assert units.tokens_dropped == TARGETS - 180 == 41
    assert units.describe().startswith("user")


def test_the_cap_truncates_users(prepared):
    one = UserUnits(TokenWindows(prepared, S), max_windows=1)
    _, mask, unit = one.batch(np.arange(4))
    assert unit.tolist() == [0, 1, 2, 3]  # one window per user: their first document's first
    assert mask.sum(axis=1).tolist() == [10, 16, 16, 16]
    assert one.tokens_kept == 58 and one.tokens_dropped == TARGETS - 58
    with pytest.raises(DataError, match="max_unit_windows=0"):
        UserUnits(TokenWindows(prepared, S), max_windows=0)


def test_a_record_without_the_user_field_is_refused(tmp_path, capsys):
    plan = [("alice", 10), ("bob", 12), (None, 9)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, **({"user": u} if u else {})}) + "\n\n"
                            for (u, _), t in zip(plan, _texts())))  # blank lines: record 3 is on line 5
    capsys.readouterr()
    assert main(["prepare-data", str(path), "--out", str(tmp_path / "out"), "--user-field", "user"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [(f"flexmoe prepare-data: error: {path}:5: record 3 has no user field 'user'; add it to every "
                    "record, or drop --user-field")]
    assert not (tmp_path / "out").exists()


def test_documents_must_map_one_to_one_to_eos_stretches(tmp_path):
    class MarkerIsEos(ByteTokenizer):  # a tokenizer with a special token the text can spell
        def encode_batch(self, texts):
            return [[self.eos_id if b == ord("#") else b for b in t.encode()] for t in texts]

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "user": u}) + "\n" for u, t in [(1, "ab"), (2, "c#d"), (1, "e")]))
    with pytest.raises(DataError, match="tokenizes to the eos id 256 itself"):
        prepare_data([src], tmp_path / "out", MarkerIsEos(), user_field="user", progress=False)
    txt = tmp_path / "plain.txt"
    txt.write_text("no records here")
    with pytest.raises(DataError, match="not a .jsonl/.ndjson file"):
        prepare_data([txt], tmp_path / "out", ByteTokenizer(), user_field="user", progress=False)
    assert not (tmp_path / "out").exists()
    # shards altered after prepare-data (an eos more than documents) are refused, not misattributed
    data = tmp_path / "ok"
    prepare_data([_write(tmp_path / "ok.jsonl")], data, ByteTokenizer(), user_field="user", progress=False)
    m = json.loads((data / "manifest.json").read_text())
    np.save(data / "user_ids.npy", np.load(data / "user_ids.npy")[:-1])  # consistent with itself, not the shards
    m["num_documents"] -= 1
    m["users"]["sha256"] = sha256_file(data / "user_ids.npy")
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="8 eos-terminated documents in the shards but 7 user ids"):
        UserUnits(TokenWindows(data, S), max_windows=CAP)


def test_unit_user_needs_user_ids(tmp_path, monkeypatch, capsys):
    pytest.importorskip("opacus")
    plain = tmp_path / "plain"
    prepare_data([_write(tmp_path / "in.jsonl")], plain, ByteTokenizer(), progress=False)  # no --user-field
    with pytest.raises(DataError, match="prepared without user ids.*--user-field"):
        open_units("user", plain, S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pytest"])  # flexmoe train hands its argv to Hydra through sys.argv
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:  # the refusal inside Hydra's job ends the process: exit code 2
        main(["train", f"out_dir={tmp_path / 'run'}", f"init_from={tmp_path / 'anchor'}", "stage=expert_anchor",
              "stage.public_mix=0", f"+data.train.code={plain}", "trainer.dtype=fp32", "privacy.enabled=true",
              "privacy.unit=user"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and f"{plain}: prepared without user ids" in lines[0] and "--user-field" in lines[0]
    assert not (tmp_path / "run").exists()


def test_book_keeping_on_user_units_equals_the_reference(prepared):
    units = UserUnits(TokenWindows(prepared, 24), max_windows=3, pad_id=0)
    check_book_keeping_on_units(units, [3, 0, 2, 1])


def test_dp_run_with_user_units(tmp_path):
    pytest.importorskip("opacus")
    cfg_model = BYTE_TINY.replace(d_model=32, d_ff=64)
    anchor = branch(make_byte_public(tmp_path, cfg_model), tmp_path / "anchor")
    text = stdlib_text(30_000)
    docs = [text[i * 97:i * 97 + 40 + (i * 37) % 150] for i in range(200)]
    src = tmp_path / "owner.jsonl"
    src.write_text("".join(json.dumps({"text": d, "author": f"u{(i * 7) % 40}"}) + "\n" for i, d in enumerate(docs)))
    data = tmp_path / "owner"
    prepare_data([src], data, ByteTokenizer(), user_field="author", progress=False)
    units = UserUnits(TokenWindows(data, 32), max_windows=4)
    assert len(units) == 40 and units.tokens_dropped > 0  # 5 documents per user: more than 4 windows each
    run = RunConfig(out_dir=str(tmp_path / "run"), init_from=str(anchor),
                    data=DataConfig(train={"code": str(data)}, seq_len=32, batch_size=4),
                    stage=StageConfig(name="expert_anchor", freeze="expert_anchor"),
                    optim=OptimConfig(lr=1e-3, warmup_steps=0), trainer=TrainerConfig(steps=3, log_every=1))
    train_private(run, PrivacyConfig(noise_multiplier=1.0, delta=1e-3, noise_seed=0, unit="user",
                                     max_unit_windows=4))
    dp = json.loads((tmp_path / "run" / "final" / "flexmoe.json").read_text())["dp"]
    assert dp["unit"].startswith("user") and dp["num_units"] == 40 and dp["steps"] == 3
    assert dp["sampling_rate"] == pytest.approx(4 / 40) and dp["clipping"] == "book_keeping"
    assert dp["tokens_not_trained"] == units.tokens_dropped
