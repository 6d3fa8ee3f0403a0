"""Tables for people keep every header and value whole, however many columns a report has."""
from __future__ import annotations

import json

import pytest

from cli.output import emit_rows


def test_wide_table_is_not_squeezed(capsys):
    columns = [f"column_number_{i}" for i in range(20)]
    rows = [{c: f"value-{i}-{j}" for j, c in enumerate(columns)} for i in range(3)]
    emit_rows(rows, title="wide")
    out = capsys.readouterr().out
    for c in columns:
        assert c in out
    assert "value-2-19" in out and "…" not in out


def test_table_lines_line_up_with_numbers_right_aligned_and_wide_characters_counted():
    from rich.cells import cell_len

    from cli.output import render_table
    values = [[1, "kan [/red]", 0.9123456, None], [22, "日本", 1e5, 3]]
    lines = render_table("t", ["run", "name", "acc", "x"], values).splitlines()
    assert lines[0].strip() == "t"
    body = lines[1:]
    assert len({cell_len(line) for line in body}) == 1  # every line as wide on screen
    assert body[1] == "┃ run ┃ name       ┃       acc ┃ x ┃"
    assert body[3] == "│   1 │ kan [/red] │    0.9123 │ - │"
    assert body[4] == "│  22 │ 日本       │ 1.000e+05 │ 3 │"
    ascii_lines = render_table("t", ["run"], [[1]], unicode=False).splitlines()
    assert ascii_lines[1:] == ["+=====+", "| run |", "+=====+", "|   1 |", "+-----+"]


def test_reports_and_export_declare_their_columns_and_empty_csv_keeps_the_header(tmp_path):
    from cli.output import to_csv
    from kanfarm.config import RunConfig
    from kanfarm.export import COLUMNS, long_rows
    from kanfarm.reports import REPORTS
    from kanfarm.reports.tables import REPORT_COLUMNS
    from kanfarm.store import Store
    from kanfarm.training import EpochRecord

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.upgrade()
    assert to_csv(REPORTS["gap"](store, None), REPORT_COLUMNS["gap"]).splitlines() == [",".join(REPORT_COLUMNS["gap"])]
    store.submit_grid("g", {}, [(RunConfig(dataset="digits", model="mlp", depth="shallow"), 100, 10)])
    (run_id,) = store.run_ids()
    store.claim(run_id, "w", 60)
    for epoch in range(3):
        store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.5 + epoch / 10, 1.0, 0.4 + epoch / 10, 0.1, {}), worker="w")
    store.finish(run_id, "w", "completed")
    for kind, report in REPORTS.items():
        assert tuple(report(store, "g")[0]) == REPORT_COLUMNS[kind], kind
    assert tuple(next(long_rows(store, "g"))) == COLUMNS
    store.dispose(close=True)


def test_export_lists_runs_without_epochs_and_their_whole_config(tmp_path):
    from kanfarm.config import RunConfig
    from kanfarm.export import long_rows
    from kanfarm.store import Store

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.upgrade()
    store.submit_grid("g", {}, [(RunConfig(dataset="digits", model="mlp", depth="shallow", patience=3), 100, None)])
    (row,) = long_rows(store, "g")
    assert row["epoch"] is None and row["status"] == "pending"
    assert row["config"]["patience"] == 3 and row["config"]["dropout"] == 0.2
    store.dispose(close=True)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def test_export_gives_json_columns_one_key_order_on_both_backends(backend, request):
    """PostgreSQL's JSONB reorders keys: the same study exported from SQLite and from PostgreSQL
    must give the same text."""
    from kanfarm.config import RunConfig
    from kanfarm.export import long_rows
    from kanfarm.training.records import EpochRecord

    store = request.getfixturevalue(f"{backend}_store")
    store.submit_grid("g", {}, [(RunConfig(dataset="digits", model="mlp", depth="shallow"), 100, None)])
    (run_id,) = store.run_ids("g")
    store.write_epoch(run_id, EpochRecord(0, 1.0, 0.5, 1.0, 0.5, 0.1, {"nhsic_y": [0.5], "nhsic_x": [0.25]}))
    (row,) = long_rows(store, "g")
    assert list(row["config"]) == sorted(RunConfig(dataset="digits").to_dict())
    assert list(row["extra"]) == ["nhsic_x", "nhsic_y"]


def test_json_writes_postgresqls_numeric_as_a_number():
    """AVG of integers is a Decimal on PostgreSQL; it came out as a string in --json."""
    from decimal import Decimal

    from cli.output import to_json

    assert json.loads(to_json({"rate": Decimal("0.25")})) == {"rate": 0.25}


def test_long_work_out_of_a_terminal_says_what_it_does_and_short_work_says_nothing(capsys, monkeypatch):
    """A spinner shows nothing in a log or a pipe: a 30 s submission looked like a hang."""
    import time

    from rich.console import Console

    from cli import output

    monkeypatch.setattr(output, "SAY_AFTER_S", 0.05)
    # as for a log file or a pipe, whatever this test runs under (FORCE_COLOR makes Rich call any stderr a terminal)
    monkeypatch.setattr(output, "err_console", Console(stderr=True, markup=False, force_terminal=False))
    with output.working("storing the cells of grid big"):
        time.sleep(0.5)
    said = capsys.readouterr().err.splitlines()
    assert said[0] == "storing the cells of grid big ..."
    assert said[1].startswith("storing the cells of grid big: done in ") and len(said) == 2
    monkeypatch.setattr(output, "SAY_AFTER_S", 5)
    with output.working("quick"):
        pass
    with pytest.raises(SystemExit), output.working("failing"):
        raise SystemExit(2)
    assert capsys.readouterr().err == ""
