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


def test_a_grid_uses_its_own_intrinsic_dimension_for_runs_stored_before(sqlite_store):
    """A run shared by two grids keeps the first grid's intrinsic dimension in ``runs``; a report
    of the second grid uses the second grid's ``[intrinsic_dim]`` table, and --intrinsic-dim wins."""
    from kanfarm.config import RunConfig
    from kanfarm.reports import efficiency_table, summary_table
    from kanfarm.training.records import EpochRecord

    store = sqlite_store
    cell = RunConfig(dataset="digits", model="mlp", depth="shallow")
    store.submit_grid("first", {"name": "first", "intrinsic_dim": {"digits": 100}}, [(cell, 1000, 100)])
    store.submit_grid("second", {"name": "second", "intrinsic_dim": {"digits": 40}}, [(cell, 1000, 40)])
    (run_id,) = store.run_ids("second")
    store.claim(run_id, "w", 60)
    store.write_epoch(run_id, EpochRecord(0, 1.0, 0.5, 1.0, 0.5, 0.1))
    store.write_epoch(run_id, EpochRecord(1, 1.0, 0.9, 1.0, 0.8, 0.1))
    store.finish(run_id, "w", "completed")
    expected = {grid: 0.8 / 2 / math.log(1 + 1000 - dim) for grid, dim in (("first", 100), ("second", 40))}
    for grid in ("first", "second"):
        assert efficiency_table(store, grid)[0]["efficiency"] == pytest.approx(expected[grid])
        assert summary_table(store, grid)[0]["efficiency"] == pytest.approx(expected[grid])
    assert efficiency_table(store, "second", intrinsic_dim={"digits": 0})[0]["efficiency"] == pytest.approx(
        0.8 / 2 / math.log(1001))
    from kanfarm.export import long_rows

    assert {grid: {r["intrinsic_dim"] for r in long_rows(store, grid)} for grid in ("first", "second")} == {
        "first": {100}, "second": {40}}  # an export of a grid states what its reports used


def test_a_grids_reports_use_its_own_intrinsic_dimensions_not_another_grids(tmp_path):
    """Grid a states none (mnist: the known 750); grid c states 40 for the run they share. The
    stored value then reads 40, but a's reports must still use 750 for both of its runs."""
    from kanfarm.grids import parse_spec
    from kanfarm.reports import efficiency_table, summary_table
    from kanfarm.store import Store
    from kanfarm.submission import submit
    from kanfarm.training import EpochRecord

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.upgrade()
    base = {"datasets": ["mnist"], "models": ["mlp"], "depths": ["shallow"], "inits": ["kaiming_normal"],
            "optimizers": ["adam"], "seeds": [0]}
    submit(store, parse_spec({**base, "name": "a", "learning_rates": [0.01, 0.02]}))
    submit(store, parse_spec({**base, "name": "c", "learning_rates": [0.01], "intrinsic_dim": {"mnist": 40}}))
    for run_id in store.run_ids("a"):
        store.claim(run_id, "w", 60)
        store.write_epoch(run_id, EpochRecord(0, 1.0, 0.5, 1.0, 0.5, 0.1, {}), worker="w")
        store.finish(run_id, "w", "completed")
    assert [r["intrinsic_dim"] for r in efficiency_table(store, "a")] == [750, 750]
    assert [r["intrinsic_dim"] for r in efficiency_table(store, "c")] == [40]
    a_summary = {r["run_id"]: r["efficiency"] for r in summary_table(store, "a")}
    assert a_summary == {r["run_id"]: r["efficiency"] for r in efficiency_table(store, "a")}
    store.dispose(close=True)
