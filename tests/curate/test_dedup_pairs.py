"""The pair search against the all-pairs float64 oracle, and the representative rules (pipeline.curate.dedup_pairs)."""

import numpy as np
import pytest
from dedupkit import oracle_groups, oracle_pairs, planted

from pipeline.curate.dedup_pairs import Rule, find_groups, representatives, tie_ranks

EPS = 0.05


def _cosines(n):
    """Planted cosines on both sides of 1 - EPS = 0.95: 0.94, 0.949, 0.951, 0.96, 0.99, 1.0 ..."""
    near = [0.94, 0.949, 0.9499, 0.9501, 0.951, 0.96, 0.99, 1.0]
    return [near[i % len(near)] for i in range(n)]


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_groups_equal_the_all_pairs_oracle(block):
    X, plants = planted(600, 32, _cosines(240), seed=1)
    got = find_groups(X, EPS, block=block)
    pairs = oracle_pairs(X, EPS)
    assert {(i, j) for i, j, c in plants if c >= 1 - EPS} <= pairs   # the planted pairs above the threshold
    assert not {(i, j) for i, j, c in plants if c < 1 - EPS} & pairs  # and none of those below
    assert got.pairs == len(pairs) == 150  # 5 of every 8 planted cosines are >= 0.95
    np.testing.assert_array_equal(got.group, oracle_groups(len(X), pairs))
    assert got.candidates >= got.pairs


def test_ten_thousand_rows_against_the_oracle():
    X, plants = planted(9000, 48, _cosines(1000), seed=2)
    got = find_groups(X, EPS, block=2048)
    pairs = oracle_pairs(X, EPS, block=2000)
    assert len(X) == 10_000 and got.pairs == len(pairs) == 625
    np.testing.assert_array_equal(got.group, oracle_groups(len(X), pairs))
    assert sorted(np.bincount(got.sizes)[1:].nonzero()[0] + 1) == [1, 2]


def test_chains_join_transitively_and_exact_copies_group():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(16)
    X = np.vstack([u, u * 2.0, rng.standard_normal(16), u * 0.5]).astype(np.float32)
    got = find_groups(X, 1e-6)
    assert got.group.tolist() == [0, 0, 2, 0] and got.pairs == 3 and got.sizes.tolist() == [3, 3, 1, 3]


def test_rule_highest_lowest_ties_by_key_and_nan_loses():
    group = np.array([0, 0, 0, 3, 3, 5])
    keys = ["c", "a", "b", "z", "y", "q"]
    ties = tie_ranks(keys, ["s"] * 6, range(6))
    values = np.array([0.9, 0.9, 0.1, np.nan, 0.2, 1.0])
    high = Rule.parse("clip_score:highest")
    assert representatives(group, high.order(values, None, keys), ties).tolist() == [1, 1, 1, 4, 4, 5]
    low = Rule.parse("clip_score:lowest")
    assert representatives(group, low.order(values, None, keys), ties).tolist() == [2, 2, 2, 4, 4, 5]
    assert Rule.parse("image_sqnorm").direction == "lowest" and Rule.parse("image_loglik").direction == "highest"


def test_rule_centroid_and_random():
    X = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], dtype=np.float32)
    group = np.zeros(4, dtype=np.int64)
    ties = tie_ranks(list("abcd"), ["s"] * 4, range(4))
    near = Rule.parse("centroid:nearest").order(None, X, list("abcd"))
    far = Rule.parse("centroid:farthest").order(None, X, list("abcd"))
    assert representatives(group, near, ties).tolist() == [1] * 4  # 0.8,0.6 and 0.6,0.8 tie: key "b" < "c"
    assert representatives(group, far, ties).tolist() == [0] * 4   # 1,0 and 0,1 tie: key "a" < "d"
    picks = {int(representatives(group, Rule.parse("random", seed=s).order(None, X, list("abcd")), ties)[0])
             for s in range(20)}
    assert len(picks) > 1  # the seed matters
    again = Rule.parse("random", seed=3).order(None, X, list("abcd"))
    assert again.tolist() == Rule.parse("random", seed=3).order(None, X, list("abcd")).tolist()


def test_rule_parse_errors():
    with pytest.raises(ValueError, match="not a score column"):
        Rule.parse("caption:highest", columns=("clip_score",))
    with pytest.raises(ValueError, match=":nearest or :farthest"):
        Rule.parse("centroid")
    with pytest.raises(ValueError, match="highest or lowest"):
        Rule.parse("clip_score:best")


@pytest.mark.gpu
def test_cuda_pair_search_equals_the_cpu_one_and_the_oracle():
    X, _ = planted(20_000, 64, _cosines(4000), seed=5)
    cpu = find_groups(X, EPS, block=4096, device="cpu")
    gpu = find_groups(X, EPS, block=4096, device="cuda")
    np.testing.assert_array_equal(gpu.group, cpu.group)
    assert gpu.pairs == cpu.pairs == len(oracle_pairs(X, EPS, block=2000)) == 2500
