"""Tables for people keep every header and value whole, however many columns a report has."""
from __future__ import annotations

from cli.output import emit_rows


def test_wide_table_is_not_squeezed(capsys):
    columns = [f"column_number_{i}" for i in range(20)]
    rows = [{c: f"value-{i}-{j}" for j, c in enumerate(columns)} for i in range(3)]
    emit_rows(rows, title="wide")
    out = capsys.readouterr().out
    for c in columns:
        assert c in out
    assert "value-2-19" in out and "…" not in out
