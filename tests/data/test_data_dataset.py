from __future__ import annotations

import numpy as np
import pytest
from datahelpers import random_text

from flexmoe.data import DataError, Mixture, TokenWindows


def _stream(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [256]  # one document, eos appended


def test_windows_cross_shard_boundaries(prepared):
    text = random_text(200, seed=1)
    full = np.asarray(_stream(text))
    small = TokenWindows(prepared("small", text, shard_tokens=7), seq_len=5)
    big = TokenWindows(prepared("big", text), seq_len=5)
    assert len(small.manifest["shards"]) == 29 and len(big.manifest["shards"]) == 1
    assert small.num_tokens == big.num_tokens == 201
    assert len(small) == len(big) == (201 - 1) // 5 == 40
    crossing = 0
    for i in range(len(small)):
        window = small[i]
        assert window.dtype == np.int64 and window.shape == (6,)
        np.testing.assert_array_equal(window, full[i * 5 : i * 5 + 6])
        np.testing.assert_array_equal(window, big[i])
        crossing += (i * 5) // 7 != (i * 5 + 5) // 7
    assert crossing > 20  # most windows straddle two (or three) 7-token shards
    np.testing.assert_array_equal(small[-1], full[195:201])  # the last window ends on eos
    with pytest.raises(IndexError):
        small[40]
    np.testing.assert_array_equal(small.windows([3, 0]), np.stack([full[15:21], full[0:6]]))
    assert small.domain == "small"


def test_window_spanning_many_shards(prepared):
    text = random_text(50, seed=2)
    tw = TokenWindows(prepared("tiny", text, shard_tokens=3), seq_len=20)
    np.testing.assert_array_equal(tw[1], np.asarray(_stream(text))[20:41])


def test_too_few_tokens_names_the_dir(prepared):
    data = prepared("short", "abc")  # 4 tokens with eos
    assert len(TokenWindows(data, seq_len=3)) == 1
    with pytest.raises(DataError, match=str(data)):
        TokenWindows(data, seq_len=4)


def test_mixture_weights(prepared):
    a = TokenWindows(prepared("a", random_text(100, 3)), seq_len=8)
    b = TokenWindows(prepared("b", random_text(100, 4)), seq_len=8)
    mix = Mixture({"b": (b, 3), "a": (a, 1)})
    assert mix.names == ["a", "b"] and mix.weights == {"a": 0.25, "b": 0.75}
    draws = mix.sample_domains(40_000, np.random.default_rng(0))
    # Binomial sd is 0.0022 here; 0.01 is a 4.5-sigma band.
    assert abs(np.mean(draws == 1) - 0.75) < 0.01
    pairs = mix.sample_indices(1000, np.random.default_rng(1))
    assert {name for name, _ in pairs} == {"a", "b"}
    assert all(0 <= i < len(mix.datasets[name]) for name, i in pairs)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(DataError, match="'a'"):
            Mixture({"a": (a, bad), "b": (b, 1)})
    with pytest.raises(DataError, match="seq_len"):
        Mixture({"a": (a, 1), "c": (TokenWindows(prepared("c", random_text(100, 5)), seq_len=4), 1)})
