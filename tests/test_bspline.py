"""Cox-de Boor bases against scipy's B-splines, and the half-open cell convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from kanfarm.models.bspline import cox_de_boor_basis, is_uniform, uniform_knots


def scipy_bases(x: np.ndarray, knots: np.ndarray, k: int) -> np.ndarray:
    """scipy's design matrix for every basis on ``knots``, valid on all of ``[t_0, t_last]``.

    ``design_matrix(extrapolate=False)`` only accepts the base interval ``[t_k, t_{n}]``; padding the
    knot vector by k equally spaced knots per side makes that interval ``[t_0, t_last]`` and the
    original bases are the padded ones shifted by k."""
    step = knots[1] - knots[0]
    padded = np.concatenate([knots[0] - step * np.arange(k, 0, -1), knots, knots[-1] + step * np.arange(1, k + 1)])
    n_bases = len(knots) - k - 1
    return BSpline.design_matrix(x, padded, k, extrapolate=False).toarray()[:, k:k + n_bases]


def ours(x: np.ndarray, knots: np.ndarray, k: int) -> np.ndarray:
    grid = torch.tensor(knots, dtype=torch.float64).unsqueeze(0)
    return cox_de_boor_basis(torch.tensor(x, dtype=torch.float64).unsqueeze(1), grid, k)[:, 0].numpy()


def assert_rel_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("grid_size", [1, 3, 5, 10])
def test_matches_scipy_inside_and_on_extended_cells(k, grid_size):
    knots = uniform_knots(1, grid_size, k, (-1.0, 1.0), dtype=torch.float64)[0].numpy()
    rng = np.random.default_rng(grid_size * 10 + k)
    inside = rng.uniform(-1, 1, 300)                       # [lo, hi): full partition of unity
    extended = rng.uniform(knots[0], knots[-1], 300)       # also the k extra cells per side
    for x in (inside, extended):
        assert_rel_close(ours(x, knots, k), scipy_bases(x, knots, k))
    assert np.allclose(ours(inside, knots, k).sum(axis=1), 1.0)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_on_every_knot_half_open_cells(k):
    knots = uniform_knots(1, 5, k, (-1.0, 1.0), dtype=torch.float64)[0].numpy()
    on_knots = knots[:-1]  # scipy also takes t_j <= x < t_{j+1} at interior knots
    assert_rel_close(ours(on_knots, knots, k), scipy_bases(on_knots, knots, k))
    if k == 0:  # indicators: a knot belongs to the cell on its right
        np.testing.assert_array_equal(ours(on_knots, knots, 0), np.eye(len(knots) - 1))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_right_end_of_range_is_continuous(k):
    """At hi (an interior knot of the extended grid) bases equal scipy's closed-interval values on
    the unextended base interval [lo, hi], i.e. their left limit, and still sum to one."""
    knots = uniform_knots(1, 5, k, (-1.0, 1.0), dtype=torch.float64)[0].numpy()
    hi = np.array([1.0])
    at_hi = ours(hi, knots, k)
    assert_rel_close(at_hi, BSpline.design_matrix(hi, knots, k, extrapolate=False).toarray())
    np.testing.assert_allclose(at_hi, ours(hi - 1e-10, knots, k), atol=1e-8)  # the left limit
    assert at_hi.sum() == pytest.approx(1.0)


def test_order_zero_excludes_right_end():
    knots = uniform_knots(1, 4, 0, (-1.0, 1.0), dtype=torch.float64)[0].numpy()
    assert not ours(np.array([1.0]), knots, 0).any()


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_zero_outside_the_knots(k):
    knots = uniform_knots(1, 5, k, (-1.0, 1.0), dtype=torch.float64)[0].numpy()
    outside = np.array([knots[0] - 1e-9, knots[0] - 3.0, knots[-1], knots[-1] + 1e-9, 50.0, -50.0])
    assert not ours(outside, knots, k).any()


def test_per_input_rows_and_non_uniform_knots():
    rng = np.random.default_rng(7)
    rows = [np.sort(rng.uniform(-2, 2, 12)), np.linspace(0, 5, 12)]
    x = np.stack([rng.uniform(r[0], r[-1], 200) for r in rows], axis=1)
    grid = torch.tensor(np.stack(rows), dtype=torch.float64)
    bases = cox_de_boor_basis(torch.tensor(x), grid, 3).numpy()
    for i, knots in enumerate(rows):
        expected = np.stack([np.nan_to_num(BSpline.basis_element(knots[j:j + 5], extrapolate=False)(x[:, i]))
                             for j in range(len(knots) - 4)], axis=1)
        assert_rel_close(bases[:, i], expected)


def test_uniform_knots_and_uniformity():
    grid = uniform_knots(3, 5, 3, (-1.0, 1.0))
    assert grid.shape == (3, 12)
    expected = torch.arange(-3, 9, dtype=torch.float32) * 0.4 - 1
    assert torch.equal(grid[2], expected)
    assert is_uniform(grid)
    bent = grid.clone()
    bent[1, 5] += 1e-3
    assert not is_uniform(bent)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        cox_de_boor_basis(torch.zeros(4, 3), uniform_knots(2, 5, 3), 3)
    with pytest.raises(ValueError):
        cox_de_boor_basis(torch.zeros(4, 1), torch.zeros(1, 3), 3)
