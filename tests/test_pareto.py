import math

import numpy as np
import pytest

from moalign.errors import MoalignError
from moalign.pareto import (
    SCALARIZATIONS,
    hypervolume,
    non_dominated,
    pareto_ranks,
    parse_weights,
    ray_distance,
    scalarize,
    simplex_grid,
)


def test_hypervolume_two_objectives_by_hand():
    # Staircase above (0, 0): union of [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1] = 3 + 1 + 1 = 6.
    points = [[1, 3], [2, 2], [3, 1]]
    assert hypervolume(points, [0, 0]) == pytest.approx(6.0)
    # A dominated point adds nothing; a point below the reference adds nothing.
    assert hypervolume(points + [[1, 1], [-1, 5]], [0, 0]) == pytest.approx(6.0)


def test_hypervolume_of_one_objective_is_the_best_point_above_the_reference():
    """A one-objective front (`moalign eval` with one objective) on many random fronts: moocore before 0.3 read
    past its buffers here and crashed the process within a few hundred calls."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        points = rng.normal(size=(int(rng.integers(1, 12)), 1))
        assert hypervolume(points, [-5.0]) == pytest.approx(points.max() + 5.0)


def test_hypervolume_three_objectives_by_hand():
    # Two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlap in a unit cube: 2 + 2 - 1 = 3.
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)


def test_hypervolume_rejects_wrong_reference_length():
    with pytest.raises(MoalignError, match="reference point"):
        hypervolume([[1, 2]], [0, 0, 0])


def test_non_dominated_and_ranks_by_hand():
    points = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 1], [0, 0]])
    assert non_dominated(points).tolist() == [True, True, True, False, False, False]
    assert pareto_ranks(points).tolist() == [0, 0, 0, 2, 1, 3]


def test_simplex_grid():
    grid = simplex_grid(2, 10)
    assert grid.shape == (11, 2)
    assert np.allclose(grid[:, 0], np.linspace(0, 1, 11))
    lattice = simplex_grid(3, 4)
    assert lattice.shape == (15, 3)  # C(4 + 2, 2)
    assert np.allclose(lattice.sum(axis=1), 1)
    assert len({tuple(row) for row in lattice}) == 15


def test_ray_distance_by_hand():
    # Normalised space: the ray for w = (0.5, 0.5) goes from (1, 1) through (0.5, 0.5): the diagonal.
    points = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    distances = ray_distance(points, [0.5, 0.5], low=[0, 0], high=[1, 1])
    assert distances[0] == pytest.approx(0.0)
    assert distances[1] == pytest.approx(np.sqrt(0.5))
    assert distances[2] == pytest.approx(np.sqrt(0.5))
    # Beyond the ideal point the ray ends: distance to the ideal point itself.
    assert distances[3] == pytest.approx(np.sqrt(2))
    # w = e_1: the ray runs down from (1, 1) along objective 2 at objective 1's maximum.
    corner = ray_distance(np.array([[1.0, 0.2], [0.6, 0.9]]), [1, 0], low=[0, 0], high=[1, 1])
    assert corner.tolist() == pytest.approx([0.0, 0.4])


# --- scalarisations (MORLAIF, Williams 2024), checked against values worked out by hand ---------------

SCALARIZATION_CASES = [(method, {}) for method in SCALARIZATIONS] + [
    ("bernoulli_nash", {"positive": "shift", "shift": 20.0}),
    ("soft_max_min", {"temperature": 0.25}),
    ("uncertainty_weighted", {"uncertainty_penalty": 3.0}),
]


@pytest.mark.parametrize(("method", "options"), SCALARIZATION_CASES)
def test_scalarize_reduces_each_sample_on_its_own(method, options):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(9, 5)) * 3.0 - 1.0  # mostly negative scores: Bernoulli–Nash must cope
    weights = rng.dirichlet(np.ones(5))
    batch = scalarize(rewards, weights, method, **options)
    rows = np.array([scalarize(row[None, :], weights, method, **options)[0] for row in rewards])
    np.testing.assert_allclose(batch, rows, rtol=1e-12, atol=1e-12)
    assert batch.shape == (9,)
    if method == "bernoulli_nash":
        assert (batch > 0).all()  # a geometric mean of positive utilities, even for negative scores


def test_scalarize_values_by_hand():
    rewards = np.array([[1.0, -2.0, 4.0]])
    w = np.array([0.5, 0.25, 0.25])  # weighted rewards r̃ = (0.5, -0.5, 1.0): mean 1/3, variance 7/18
    assert scalarize(rewards, w, "linear")[0] == pytest.approx(1.0)
    assert scalarize(rewards, w, "worst_case")[0] == pytest.approx(-0.5)
    assert scalarize(rewards, w, "median")[0] == pytest.approx(0.5)
    assert scalarize(rewards, w, "lower_quantile")[0] == pytest.approx(-0.5)  # ⌊3/3⌋ = 1 smallest
    # mean − λ·variance: λ = 0.5 by default (1/3 − 7/36), λ = 2 given (1/3 − 14/18)
    assert scalarize(rewards, w, "uncertainty_weighted")[0] == pytest.approx(5 / 36)
    assert scalarize(rewards, w, "uncertainty_weighted", uncertainty_penalty=2.0)[0] == pytest.approx(-4 / 9)
    # softmin weights e^(−r̃)/Σ e^(−r̃) on r̃; a cold temperature leaves only the minimum
    e = math.exp
    softmin = (0.5 * e(-0.5) - 0.5 * e(0.5) + 1.0 * e(-1.0)) / (e(-0.5) + e(0.5) + e(-1.0))
    assert scalarize(rewards, w, "soft_max_min")[0] == pytest.approx(softmin)
    assert scalarize(rewards, w, "soft_max_min", temperature=0.01)[0] == pytest.approx(-0.5)
    # geometric mean of softplus(r̃) = log(1 + e^r̃), or of r̃ + shift
    nash = (math.log1p(e(0.5)) * math.log1p(e(-0.5)) * math.log1p(e(1.0))) ** (1 / 3)
    assert scalarize(rewards, w, "bernoulli_nash")[0] == pytest.approx(nash)
    assert scalarize(rewards, w, "bernoulli_nash", positive="shift", shift=1.0)[0] == pytest.approx(1.5 ** (1 / 3))


def test_scalarize_even_number_of_objectives_by_hand():
    # r̃ = (1, 0.25, 0.75, 0.5): the median is the mean of the middle two, 0.625 (torch.median: 0.5)
    assert scalarize([[4.0, 1.0, 3.0, 2.0]], [0.25] * 4, "median")[0] == pytest.approx(0.625)
    # six objectives, r̃ = (1, 5/6, …, 1/6): the lower third is the two smallest, mean 1/4
    assert scalarize([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], [1 / 6] * 6, "lower_quantile")[0] == pytest.approx(0.25)


def test_scalarize_bad_input():
    with pytest.raises(MoalignError, match="unknown scalarisation"):
        scalarize([[1, 2]], [0.5, 0.5], "nope")
    with pytest.raises(MoalignError, match="non-positive"):
        scalarize([[-5, 2]], [0.5, 0.5], "bernoulli_nash", positive="shift", shift=1.0)
    with pytest.raises(MoalignError, match="temperature > 0"):
        scalarize([[1, 2]], [0.5, 0.5], "soft_max_min", temperature=0.0)


@pytest.mark.parametrize(
    "text, message",
    [("0.5,0.6", "sum to 1"), ("-0.5,1.5", "non-negative"), ("0.2,0.3,0.5", "expected 2"), ("a,b", "numbers")],
)
def test_bad_weights(text, message):
    with pytest.raises(MoalignError, match=message):
        parse_weights(text, 2)


def test_preference_entries_expand_to_validated_vectors_in_order():
    from moalign.pareto import parse_preferences, preference_name

    rows = parse_preferences(["grid:2", "0.3,0.7", [0.2, 0.8]], 2)
    assert rows.tolist() == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.3, 0.7], [0.2, 0.8]]
    assert parse_preferences([], 3).tolist() == [[1 / 3, 1 / 3, 1 / 3]]
    assert parse_preferences(["onehot"], 2).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert preference_name([0.25, 0.75]) == "w0.25-0.75"
    assert preference_name([1 / 3, 2 / 3]) == "w0.3333-0.6667"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["grid:2", "onehot"], "twice"),
        (["0.5,0.5", [0.5, 0.5]], "twice"),
        (["grid:x"], "grid:D"),
        (["grid:0"], "grid:D"),
        (["0.2,0.3"], "sum to 1"),
        (["a,b"], "use '0.2,0.8'"),
        (["0.2,0.3,0.5"], "expected 2"),
    ],
)
def test_bad_preference_entries_are_one_line(entries, message):
    from moalign.pareto import parse_preferences

    with pytest.raises(MoalignError, match=message):
        parse_preferences(entries, 2)
