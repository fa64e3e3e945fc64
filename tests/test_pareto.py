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


@pytest.mark.parametrize("method", SCALARIZATIONS)
def test_scalarize_batch_equals_row_by_row(method):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(16, 5)) * 3  # includes negative scores (Bernoulli–Nash must cope)
    weights = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    batch = scalarize(rewards, weights, method)
    rows = np.array([scalarize(row[None, :], weights, method)[0] for row in rewards])
    assert batch.shape == (16,)
    assert np.allclose(batch, rows)
    assert np.isfinite(batch).all()


def test_scalarize_values_by_hand():
    rewards = np.array([[1.0, -2.0, 4.0]])
    w = np.array([0.5, 0.25, 0.25])  # weighted: 0.5, -0.5, 1.0
    assert scalarize(rewards, w, "linear")[0] == pytest.approx(1.0)
    assert scalarize(rewards, w, "worst_case")[0] == pytest.approx(-0.5)
    assert scalarize(rewards, w, "median")[0] == pytest.approx(0.5)
    assert scalarize(rewards, w, "lower_quantile")[0] == pytest.approx(-0.5)  # floor(3/3) = 1 smallest
    assert scalarize(rewards, w, "uncertainty_weighted", uncertainty_penalty=2.0)[0] == pytest.approx(
        np.mean([0.5, -0.5, 1.0]) - 2.0 * np.var([0.5, -0.5, 1.0])
    )
    soft = np.exp(-np.array([0.5, -0.5, 1.0]))
    soft /= soft.sum()
    assert scalarize(rewards, w, "soft_max_min")[0] == pytest.approx(float(soft @ [0.5, -0.5, 1.0]))
    expected_nash = np.exp(np.mean(np.log(np.logaddexp(0, [0.5, -0.5, 1.0]))))
    assert scalarize(rewards, w, "bernoulli_nash")[0] == pytest.approx(expected_nash)
    assert scalarize(rewards, w, "bernoulli_nash", positive="shift", shift=1.0)[0] == pytest.approx(
        np.exp(np.mean(np.log([1.5, 0.5, 2.0])))
    )


def test_scalarize_bad_input():
    with pytest.raises(MoalignError, match="unknown scalarisation"):
        scalarize([[1, 2]], [0.5, 0.5], "nope")
    with pytest.raises(MoalignError, match="non-positive"):
        scalarize([[-5, 2]], [0.5, 0.5], "bernoulli_nash", positive="shift", shift=1.0)


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
