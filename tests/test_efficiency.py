"""The efficiency metric against FACTS.md, and the overfitting onset."""
import math

import pytest

from kanfarm.reports import efficiency, overfit_onset


def test_efficiency_formula():
    # A / (t + 1) / ln(1 + N - ID), MNIST shallow KAN (254,080 parameters) reaching 0.95 at epoch 4.
    assert efficiency(0.95, 4, 254_080, 750) == pytest.approx(0.95 / 5 / math.log(1 + 254_080 - 750))


def test_efficiency_largest_before_training_and_just_above_id():
    assert efficiency(0.9, 0, 1000, 750) > efficiency(0.9, 1, 1000, 750) > efficiency(0.9, 1, 100_000, 750)


@pytest.mark.parametrize("n_params,dim", [(750, 750), (700, 750), (1000, None)])
def test_efficiency_undefined(n_params, dim):
    assert efficiency(0.9, 3, n_params, dim) is None


def test_efficiency_refuses_accuracy_outside_unit_interval():
    with pytest.raises(ValueError):
        efficiency(97.5, 3, 10_000, 0)


def test_overfit_onset():
    assert overfit_onset([(0, 0.1), (1, 0.8), (2, 0.9), (3, 0.85), (4, 0.9)]) == 2
    assert overfit_onset([(0, 0.1), (1, 0.8), (2, 0.9)]) is None
    assert overfit_onset([(0, 0.1), (1, 0.9), (2, 0.899)], tolerance=0.01) is None
