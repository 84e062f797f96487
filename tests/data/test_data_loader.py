from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datahelpers import random_text

from flexmoe.data import BatchLoader, DataError, Mixture, TokenWindows

SEQ = 16


@pytest.fixture
def windows(prepared) -> TokenWindows:
    # 1,601 tokens -> 100 windows of 17 tokens; random text makes every window distinct.
    return TokenWindows(prepared("single", random_text(1600, seed=7)), seq_len=SEQ)


@pytest.fixture
def mixture(prepared) -> Mixture:
    # Each domain is made of one letter, so a window's letter tells its domain.
    a = TokenWindows(prepared("a", "a" * 400), seq_len=SEQ)
    b = TokenWindows(prepared("b", "b" * 700), seq_len=SEQ)
    c = TokenWindows(prepared("c", random_text(900, seed=8, alphabet="cdefgh")), seq_len=SEQ)
    return Mixture({"a": (a, 1.0), "b": (b, 2.0), "c": (c, 1.0)})


def _take(loader: BatchLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def _index_of(windows: TokenWindows) -> dict[bytes, int]:
    table = {windows[i].tobytes(): i for i in range(len(windows))}
    assert len(table) == len(windows)
    return table


def test_batches_are_windows_and_epochs_cover_each_once(windows):
    loader = BatchLoader(windows, 4, seed=3)
    assert loader.steps_per_epoch == 25
    table = _index_of(windows)
    seen = []
    for batch in _take(loader, 25):
        assert batch.dtype == torch.int64 and batch.shape == (4, SEQ + 1)
        seen += [table[row.numpy().tobytes()] for row in batch]
    assert sorted(seen) == list(range(100))  # one epoch = every window exactly once
    expected = np.random.default_rng([3, 0]).permutation(100)
    assert seen == expected.tolist()
    epoch1 = [table[row.numpy().tobytes()] for b in _take(loader, 25) for row in b]
    assert epoch1 == np.random.default_rng([3, 1]).permutation(100).tolist() != seen
    ordered = BatchLoader(windows, 4, shuffle=False)
    assert [table[r.numpy().tobytes()] for r in next(ordered)] == [0, 1, 2, 3]


def test_same_seed_same_batches(windows, mixture):
    for source in (windows, mixture):
        one = _take(BatchLoader(source, 3, seed=5), 40)
        two = _take(BatchLoader(source, 3, seed=5), 40)
        other = _take(BatchLoader(source, 3, seed=6), 40)
        assert all(torch.equal(x, y) for x, y in zip(one, two))
        assert not all(torch.equal(x, y) for x, y in zip(one, other))


@pytest.mark.parametrize("skip", [0, 7, 30])  # 30 steps crosses the 25-step epoch boundary
def test_resume_gives_identical_next_batches(windows, mixture, skip):
    for source in (windows, mixture):
        reference = BatchLoader(source, 4, seed=11)
        _take(reference, skip)
        state = json.loads(json.dumps(reference.state_dict()))  # must survive JSON
        expected = _take(reference, 30)
        resumed = BatchLoader(source, 4, seed=11)
        _take(resumed, 3)  # a loader elsewhere in its stream is moved, not appended to
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(_take(resumed, 30), expected))


def test_two_ranks_split_the_global_batch(windows, mixture):
    for source in (windows, mixture):
        whole = BatchLoader(source, 6, seed=2)
        ranks = [BatchLoader(source, 3, seed=2, rank=r, world_size=2) for r in range(2)]
        for _ in range(40):
            parts = [next(r) for r in ranks]
            assert torch.equal(torch.cat(parts), next(whole))
        # A checkpoint from 2 ranks resumes on 1 rank when the global batch is unchanged.
        single = BatchLoader(source, 6, seed=2)
        single.load_state_dict(ranks[0].state_dict())
        assert torch.equal(next(single), next(whole))


def test_mixture_proportions(mixture):
    loader = BatchLoader(mixture, 8, seed=0)
    first = [chr(x) for x in torch.cat(_take(loader, 500))[:, 0].tolist()]  # 4,000 samples
    domains = [x if x in "ab" else "c" for x in first]
    share = {d: domains.count(d) / len(domains) for d in "abc"}
    # Weights 1:2:1; binomial sd <= 0.008 at n=4000, so 0.03 is a >3.7-sigma band.
    assert abs(share["a"] - 0.25) < 0.03 and abs(share["b"] - 0.5) < 0.03 and abs(share["c"] - 0.25) < 0.03
    state = loader.state_dict()
    assert sum(state["cursors"].values()) == 4000


def test_mixture_domain_walks_its_epoch_without_repeats(mixture):
    loader = BatchLoader(mixture, 8, seed=4)
    table = _index_of(mixture.datasets["c"])
    seen = []
    while len(seen) < len(table):
        seen += [table[r.numpy().tobytes()] for r in next(loader) if r.numpy().tobytes() in table]
    assert sorted(seen[: len(table)]) == list(range(len(table)))


def test_bad_settings_and_mismatched_state(windows, prepared):
    with pytest.raises(DataError, match="rank"):
        BatchLoader(windows, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size"):
        BatchLoader(windows, 0)
    with pytest.raises(DataError, match=str(windows.data_dir)):
        BatchLoader(windows, 101)
    state = BatchLoader(windows, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        BatchLoader(windows, 4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch_size"):
        BatchLoader(windows, 2, seed=1).load_state_dict(state)
    other = TokenWindows(prepared("other", random_text(800, seed=9)), seq_len=SEQ)
    with pytest.raises(DataError, match="num_windows"):
        BatchLoader(other, 4, seed=1).load_state_dict(state)
