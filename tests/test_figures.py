"""Figures and the HTML report from a small synthetic database (no training).

Grid "full": digits with 3 models x 2 depths x 2 learning rates (backprop, one run diverged), kan and
mlp shallow with HSIC, an MNIST KAN degree study (widths 16, 32 x spline orders 2, 3), and one run
pending and one running so the grid is partial. Grid "empty": nothing finished.
"""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from matplotlib.collections import PathCollection

from kanfarm.config import RunConfig
from kanfarm.reports import figures as F
from kanfarm.reports.html import render_html, write_html
from kanfarm.reports.tables import with_settings
from kanfarm.store import Store
from kanfarm.training.records import EpochRecord

FIGURES = ("accuracy", "sensitivity", "efficiency", "gap", "learning_curves", "trainers", "degree")
DESCRIPTION = "<script>alert('x')</script> KAN & MLP"


def _finish(store: Store, run_id: int, accs: list[float], diverge: bool = False) -> None:
    """Epoch rows with test accuracy ``accs`` (train 0.1 above), optionally a diverged last epoch."""
    store.claim(run_id, "w", 60)
    for epoch, acc in enumerate(accs):
        store.write_epoch(run_id, EpochRecord(epoch, 1.0, min(1.0, acc + 0.1), 1.0, acc, 0.01))
    if diverge:
        store.write_epoch(run_id, EpochRecord(len(accs), None, None, None, None, 0.01, diverged=True))
    store.finish(run_id, "w", "diverged" if diverge else "completed")


def _full_grid(store: Store) -> dict[str, int]:
    cells = []
    for model in ("kan", "mlp", "mlp_wide"):
        for depth in ("shallow", "medium"):
            for lr in (0.01, 0.001):
                cells.append(RunConfig(dataset="digits", model=model, depth=depth, lr=lr))
    cells += [RunConfig(dataset="digits", model=m, depth="shallow", lr=0.01, trainer="hsic") for m in ("kan", "mlp")]
    cells += [RunConfig(dataset="mnist", model="kan", depth=None, hidden_widths=(w,), spline_order=k)
              for w in (16, 32) for k in (2, 3)]
    waiting = [RunConfig(dataset="digits", model="mlp", depth="deep", lr=lr) for lr in (0.01, 0.001)]
    sized = [(c, 1000 + 100 * i, 50 if c.dataset == "digits" else 750) for i, c in enumerate(cells + waiting)]
    store.submit_grid("full", {"name": "full", "description": DESCRIPTION, "intrinsic_dim": {"digits": 50}}, sized)
    ids = store.run_ids("full")
    for i, run_id in enumerate(ids[:len(cells)]):
        _finish(store, run_id, [0.2, 0.4 + 0.02 * i, 0.3 + 0.02 * i], diverge=(i == 0))
    store.claim(ids[-1], "w", 60)  # running; the one before it stays pending
    return {"finished": len(cells), "digits": 14, "mnist": 4}


@pytest.fixture
def store(sqlite_url):
    store = Store(sqlite_url)
    store.upgrade()
    _full_grid(store)
    store.submit_grid("empty", {"name": "empty"},
                      [(RunConfig(dataset="digits", model="kan", lr=lr, seed=1), 500, None) for lr in (0.1, 0.01, 0.001)])
    store.claim(store.run_ids("empty")[0], "w", 60)
    yield store
    store.dispose(close=True)


def _panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


# -- figures from plain rows --------------------------------------------------------------------

def test_bar_figures_hold_one_bar_per_model_depth_and_scheme_whiskers(store):
    rows = store.summary("full")
    for fig in (F.accuracy_bars(rows), F.gap_bars(rows)):
        panels = _panels(fig)
        assert set(panels) == {"digits", "mnist"}
        # digits: shallow has kan, mlp (both trainers) and mlp_wide = 5 bars; medium 3 (backprop only)
        assert len(panels["digits"].patches) == 8
        # kan [16] and [32] at spline orders 2 and 3: a setting, not a scheme, so a bar each
        assert len(panels["mnist"].patches) == 4
        assert [t.get_text() for t in panels["mnist"].get_xticklabels()] == [
            "[16]\nk=2", "[16]\nk=3", "[32]\nk=2", "[32]\nk=3"]
        assert [t.get_text() for t in panels["digits"].get_xticklabels()] == ["shallow", "medium"]
        # whiskers (one errorbar per bar) span the two learning rates
        assert len(panels["digits"].containers) == 16
    best = max(r["best_test_acc"] for r in rows if r["dataset"] == "mnist")
    assert max(p.get_height() for p in _panels(F.accuracy_bars(rows))["mnist"].patches) == pytest.approx(best)


def _bar_values(ax) -> list[tuple[float, float, float]]:
    """(height, whisker low, whisker high) of every bar of a panel, sorted."""
    from matplotlib.container import ErrorbarContainer

    whiskers = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            (low, high), = [(seg[0][1], seg[1][1]) for seg in container.lines[2][0].get_segments()]
            whiskers[round(container.lines[2][0].get_segments()[0][0][0], 9)] = (low, high)
    bars = [(round(p.get_x() + p.get_width() / 2, 9), p.get_height()) for p in ax.patches]
    return sorted((round(h, 9), round(whiskers[x][0], 9), round(whiskers[x][1], 9)) for x, h in bars)


def _expected_bars(rows, value: str, height) -> list[tuple[float, float, float]]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["dataset"] == "digits" and r[value] is not None:
            groups.setdefault((r["depth"], r["model"], r["trainer"]), []).append(r[value])
    return sorted((round(height(v), 9), round(min(v), 9), round(max(v), 9)) for v in groups.values())


def test_bar_heights_and_whiskers_are_the_schemes_best_or_median_and_range(store):
    """A bar is the best scheme (accuracy) or the median one (gap) of its model, trainer and depth;
    its whiskers span every scheme. Gaps here differ run by run, so median, max and min differ."""
    import statistics

    rows = [dict(r) for r in store.summary("full")]
    for r in rows:
        if r["gap_at_best"] is not None:
            r["gap_at_best"] = r["run_id"] / 100
    digits = _panels(F.accuracy_bars(rows))["digits"]
    assert _bar_values(digits) == _expected_bars(rows, "best_test_acc", max)
    assert any(low < high for _, low, high in _bar_values(digits))  # the two learning rates differ
    gaps = _panels(F.gap_bars(rows))["digits"]
    assert _bar_values(gaps) == _expected_bars(rows, "gap_at_best", statistics.median)


def test_degree_figure_plots_each_orders_best_scheme(store):
    """A second, weaker and a third, stronger scheme per cell: the line goes through the best."""
    rows = [dict(r) for r in store.summary("full") if r["dataset"] == "mnist"]
    extra = []
    for r in rows:
        extra += [{**r, "run_id": r["run_id"] + 1000, "lr": 0.5, "best_test_acc": r["best_test_acc"] - 0.3},
                  {**r, "run_id": r["run_id"] + 2000, "lr": 0.05, "best_test_acc": r["best_test_acc"] + 0.05}]
    left, _ = F.degree_vs_width(rows + extra).axes
    for line in left.lines:
        width = int(line.get_label().split()[1])
        want = [max(r["best_test_acc"] for r in rows + extra if r["hidden_widths"] == str(width)
                    and r["spline_order"] == k) for k in (2, 3)]
        assert list(line.get_ydata()) == pytest.approx(want), width


def test_sensitivity_has_one_box_per_setting(store):
    panels = _panels(F.sensitivity_boxes(store.summary("full")))
    assert len(panels["digits"].patches) == 8  # patch_artist boxes
    labels = [t.get_text() for t in panels["digits"].get_xticklabels()]
    assert labels[0] == "kan\n(backprop)\nshallow" and "mlp\n(hsic)\nshallow" in labels
    # mnist: two widths x two spline orders are four settings, not two pooled boxes
    assert len(panels["mnist"].patches) == 4
    assert [t.get_text() for t in panels["mnist"].get_xticklabels()] == [
        f"kan\n(backprop)\n[{w}]\nk={k}" for w in (16, 32) for k in (2, 3)]


def test_sensitivity_table_pools_schemes_only(store):
    """Runs that differ in a setting (spline order here) are separate rows; schemes are pooled."""
    from kanfarm.reports import sensitivity_table

    summary = {r["run_id"]: r for r in store.summary("full")}
    rows = sensitivity_table(store, "full")
    mnist = [r for r in rows if r["dataset"] == "mnist"]
    assert [(r["hidden_widths"], r["spline_order"], r["runs"]) for r in mnist] == [
        ("16", 2, 1), ("16", 3, 1), ("32", 2, 1), ("32", 3, 1)]
    assert {r["depth"] for r in mnist} == {None}  # widths grids have no depth preset, as in every report
    kan_shallow = next(r for r in rows if (r["dataset"], r["model"], r["depth"], r["trainer"])
                       == ("digits", "kan", "shallow", "backprop"))
    accs = sorted(s["best_test_acc"] for s in summary.values() if s["status"] in ("completed", "diverged")
                  and (s["dataset"], s["model"], s["depth"], s["trainer"]) == ("digits", "kan", "shallow", "backprop"))
    assert kan_shallow["runs"] == 2 and (kan_shallow["min"], kan_shallow["max"]) == (accs[0], accs[-1])
    assert kan_shallow["divergence_rate"] == 0.5  # the first run diverged


def test_efficiency_scatter_one_collection_per_model_on_log_axis(store):
    from kanfarm.reports import efficiency_table

    rows = efficiency_table(store, "full")
    ax = F.efficiency_scatter(rows).axes[0]
    assert ax.get_xscale() == "log"
    points = {c.get_label(): len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)}
    assert points == {"kan": 4 + 1 + 4, "mlp": 5, "mlp_wide": 4}
    assert sum(points.values()) == sum(r["efficiency"] is not None for r in rows) == 18


def test_learning_curves_plot_best_and_worst_run(store):
    rows = store.summary("full")
    fig = F.learning_curves(rows, store.epoch_metrics(grid="full"))
    panels = _panels(fig)
    # the grid mixes trainers: an HSIC run is never the "best" or "worst" backprop run
    assert {"digits / kan (backprop)", "digits / kan (hsic)", "mnist / kan (backprop)"} <= set(panels)
    assert len(panels["digits / kan (backprop)"].lines) == 4  # best and worst, train and test each
    worst_test = panels["digits / kan (backprop)"].lines[3]
    assert list(worst_test.get_xdata()) == [0, 1, 2]  # the diverged epoch has no accuracy to draw
    assert worst_test.get_marker() == "o"  # a run that diverged after epoch 0 still shows its point
    assert "(diverged)" in worst_test.get_label()
    from kanfarm.reports._plotdata import arch_label

    archs = {r["run_id"]: arch_label(r) for r in rows}  # each run labelled with its architecture too
    labels = [line.get_label() for ax in fig.axes for line in ax.lines if not line.get_label().startswith("_")]
    assert labels and all(label.split()[2] == archs[int(label.split()[1][1:])] for label in labels), labels
    assert len(panels["mnist / kan (backprop)"].lines) == 4
    # the best run (highest best test accuracy, ties to the lower id) first, the worst last; here
    # the older the run the better, as the fixture's accuracies would grow with the id
    rows = [dict(r) for r in rows]
    kan = [r for r in rows if (r["dataset"], r["model"], r["trainer"]) == ("digits", "kan", "backprop")
           and r["best_test_acc"] is not None]
    for r in kan:
        r["best_test_acc"] = 1 - r["run_id"] / 100
    panels = _panels(F.learning_curves(rows, store.epoch_metrics(grid="full")))
    best = max(kan, key=lambda r: (r["best_test_acc"], -r["run_id"]))["run_id"]
    worst = min(kan, key=lambda r: (r["best_test_acc"], r["run_id"]))["run_id"]
    shown = [int(line.get_label().split()[1][1:]) for line in panels["digits / kan (backprop)"].lines
             if not line.get_label().startswith("_")]
    assert best != worst and shown[0] == best and shown[-1] == worst, (shown, best, worst)
    off = [ax for ax in fig.axes if not ax.axison]
    assert len(off) == 4 and not off[0].lines  # mnist has only backprop KAN runs


def test_trainers_and_degree_figures(store):
    rows = store.summary("full")
    panels = _panels(F.trainer_bars(rows))
    assert len(panels["digits"].patches) == 8
    assert [t.get_text() for t in panels["digits"].get_legend().get_texts()] == ["backprop", "hsic"]
    degree = F.degree_vs_width(rows)
    left, right = degree.axes
    assert [line.get_label() for line in left.lines] == ["width 16", "width 32"]
    assert [list(line.get_xdata()) for line in left.lines] == [[2, 3], [2, 3]]
    assert right.get_xscale() == "log"


def test_figures_without_data_say_what_is_missing(store):
    backprop_only = [r for r in store.summary("full") if r["trainer"] == "backprop"]
    with pytest.raises(F.NoData, match="found: backprop"):
        F.trainer_bars(backprop_only)
    with pytest.raises(F.NoData, match="degree study"):
        F.degree_vs_width([r for r in backprop_only if r["dataset"] == "digits"])
    for make in (F.accuracy_bars, F.sensitivity_boxes, F.gap_bars, F.efficiency_scatter):
        with pytest.raises(F.NoData):
            make(store.summary("empty"))


def test_build_figures_on_partial_and_empty_grids(store):
    full = F.build_figures(store, "full")
    assert set(full.figures) == set(FIGURES) and not full.skipped
    assert full.note == ("18 of 20 runs finished; the figures and the efficiency, gap and sensitivity tables "
                         "leave out 1 pending, 1 running (the summary lists them, with their results so far)")
    empty = F.build_figures(store, "empty")
    assert not empty.figures and set(empty.skipped) == set(FIGURES)
    assert empty.note == "no finished runs yet: 2 pending, 1 running"
    assert F.build_figures(store, "nope").note == "no runs in grid 'nope' yet: submit a grid first"


# -- HTML page and CLI ----------------------------------------------------------------------------------------

@pytest.fixture
def cli(store, sqlite_url, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("KANFARM_DATABASE_URL", sqlite_url)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["report", *args])


# -- HTML page ----------------------------------------------------------------------------------

class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.tags, self.urls = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.imgs.append(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]


def _parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


def test_cli_html_page_embeds_every_figure_and_the_tables(cli, tmp_path):
    result = cli("html", "--grid", "full", "--out", str(tmp_path / "report.html"))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = _parse(text)
    assert {img["id"] for img in page.imgs} == {f"fig-{name}" for name in FIGURES}
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,") and img["alt"]
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(u.startswith("data:") for u in page.urls)  # nothing fetched from the network
    assert not {"script", "link", "iframe"} & set(page.tags)  # the spec's <script> is escaped text
    assert {"table-summary", "table-gap", "table-efficiency", "table-sensitivity", "spec", "environment",
            "missing"} <= page.ids
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; KAN &amp; MLP" in text
    assert "1 pending, 1 running" in text and "torch" in text and "cpu_count" in text
    assert not list(tmp_path.glob(".*.tmp"))


def test_html_page_reads_the_summary_view_once_and_says_the_same(store, monkeypatch):
    """Its figures and four tables all start from run_summary, which on a large database is the
    slow part (it was read 8 times a page)."""
    reads = []
    summary = store.summary
    plain = render_html(store, "full")
    monkeypatch.setattr(store, "summary", lambda grid=None: reads.append(grid) or summary(grid))
    once = render_html(store, "full")
    assert reads == ["full"]
    strip = lambda page: re.sub(r"generated [^;]*;", "", page)  # noqa: E731  (the page's own time)
    assert strip(once) == strip(plain)


def test_html_tables_are_the_reports_rows(store):
    """Each table of the page holds what its report computes on its own (the page shares one read
    of the summary view between them: a report that changed the rows it was given would show)."""
    from kanfarm.reports.html import TABLES, html_table

    page = render_html(store, "full")
    for name, table in TABLES.items():
        rows = table(store, "full")
        assert rows, name
        assert html_table(rows, f"table-{name}") in page, name


def test_html_page_says_when_the_grid_holds_cells_of_an_earlier_spec(sqlite_url):
    """`grid submit` of a shrunk spec replaces the stored spec, the grid keeps every run: the page
    shows the new spec above tables that hold the old cells too."""
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit

    store = Store(sqlite_url)
    store.upgrade()
    spec = {"name": "shrunk", "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"],
            "inits": ["kaiming_normal"], "optimizers": ["adam"], "learning_rates": [0.01, 0.001, 0.0001],
            "seeds": [0], "epochs": 2}
    submit(store, parse_spec(spec))
    assert 'id="beyond-spec"' not in render_html(store, "shrunk")
    submit(store, parse_spec({**spec, "learning_rates": [0.01]}))
    page = render_html(store, "shrunk")
    assert "The grid also holds 2 runs that are not cells of this spec" in page
    assert 'id="beyond-spec"' not in render_html(store, None)  # all grids: no one spec to compare with
    store.dispose(close=True)


def test_html_page_of_an_empty_grid_says_what_is_missing(store):
    text = render_html(store, "empty")
    page = _parse(text)
    assert not page.imgs and "missing" in page.ids and "skipped" in page.ids
    assert "no finished runs yet: 2 pending, 1 running" in text
    assert "Traceback" not in text


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_html_page_renders_in_headless_chromium(store, tmp_path):
    from matplotlib.image import imread

    path = write_html(store, "full", tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={shot}", path.as_uri()], check=True, timeout=60, capture_output=True)
    pixels = imread(shot)
    assert pixels.std() > 0.01  # not a blank page


def test_cli_plot_writes_png_and_svg(cli, tmp_path):
    out = tmp_path / "figs"
    result = cli("plot", "--grid", "full", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{ext}" for n in FIGURES for ext in ("png", "svg"))
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (out / "degree.svg").read_text()
    # the same folder for a grid with less to show: the figures it skips are still there, from the
    # earlier plot, and it says so
    result = cli("plot", "--grid", "empty", "--out", str(out))
    assert "skipped accuracy: no finished run has a test accuracy (accuracy.png and accuracy.svg in" \
        in result.output.replace("\n", " ") and "earlier plot" in result.output


def test_cli_plot_and_html_on_an_empty_grid(cli, tmp_path):
    result = cli("plot", "--grid", "empty", "--out", str(tmp_path / "figs"))
    assert result.exit_code == 0, result.output
    assert "no finished runs yet: 2 pending, 1 running" in result.output
    assert "skipped trainers: needs finished runs of both backprop and hsic" in result.output
    assert not (tmp_path / "figs").exists()  # nothing to write: no folder either
    result = cli("html", "--grid", "empty", "--out", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    assert "no finished runs yet" in (tmp_path / "r.html").read_text()
    result = cli("html", "--grid", "nope", "--out", str(tmp_path / "x.html"))
    assert result.exit_code == 2 and "no grid named 'nope'" in result.output
    assert not (tmp_path / "x.html").exists()


def test_sensitivity_tells_settings_the_view_does_not_hold_apart(sqlite_url):
    """Batch norm (or HSIC's format stage, dropout, ...) lives only in the stored config: runs that
    differ in it are separate settings, in the table and in the figure."""
    from kanfarm.reports import sensitivity_table

    store = Store(sqlite_url)
    store.upgrade()
    try:
        cells = [RunConfig(dataset="digits", model="mlp", depth="shallow", lr=lr, batch_norm=bn)
                 for bn in (False, True) for lr in (0.1, 0.01)]
        store.submit_grid("bn", {"name": "bn"}, [(c, 1000, None) for c in cells])
        for i, run_id in enumerate(store.run_ids("bn")):
            _finish(store, run_id, [0.2, 0.5 + 0.1 * i])
        rows = sensitivity_table(store, "bn")
        assert [(r["batch_norm"], r["runs"]) for r in rows] == [(False, 2), (True, 2)]
        labels = [t.get_text() for t in F.sensitivity_boxes(with_settings(store, "bn")).axes[0].get_xticklabels()]
        assert labels == ["mlp\nshallow\nbatch norm False", "mlp\nshallow\nbatch norm True"]
    finally:
        store.dispose(close=True)


def test_sensitivity_statistics_against_a_direct_calculation(sqlite_url):
    """Five runs of one setting: best accuracies 0.1, 0.2, 0.4, 0.9, and one that diverged before
    any accuracy (it counts in runs and the divergence rate, not in the spread). Four values, so
    median, quartiles and the sample standard deviation each differ from their look-alikes."""
    import statistics

    from kanfarm.reports import sensitivity_table

    store = Store(sqlite_url)
    store.upgrade()
    try:
        cells = [RunConfig(dataset="digits", model="mlp", depth="shallow", lr=lr) for lr in (0.5, 0.1, 0.05, 0.01, 0.005)]
        store.submit_grid("s", {"name": "s"}, [(c, 1000, None) for c in cells])
        ids = store.run_ids("s")
        for run_id, best in zip(ids, (0.1, 0.2, 0.4, 0.9)):
            _finish(store, run_id, [0.05, best])
        _finish(store, ids[4], [], diverge=True)
        (row,) = sensitivity_table(store, "s")
        accs = [0.1, 0.2, 0.4, 0.9]
        assert (row["runs"], row["count"], row["divergence_rate"]) == (5, 4, 0.2)
        assert row["mean"] == pytest.approx(0.4) and row["median"] == pytest.approx(0.3)
        assert row["std"] == pytest.approx(statistics.stdev(accs)) and row["std"] != pytest.approx(statistics.pstdev(accs))
        # inclusive quartiles of 0.1, 0.2, 0.4, 0.9: q1 = 0.175, q3 = 0.525
        assert row["iqr"] == pytest.approx(0.35)
        assert (row["min"], row["max"]) == (0.1, 0.9)
    finally:
        store.dispose(close=True)


def test_every_setting_beyond_model_widths_and_trainer_has_a_label():
    """Boxes that differ only in a setting without a label would read the same."""
    from kanfarm.reports import _plotdata
    from kanfarm.reports.tables import SETTING_COLUMNS

    labelled = set(SETTING_COLUMNS) - {"dataset", "model", "depth", "hidden_widths", "trainer"}
    assert set(_plotdata._SETTING_NAMES) == labelled
    row = {"model": "kan", "trainer": "backprop", "dataset_options": {"vocab_size": 2000}, "patience": 3}
    assert _plotdata.settings_label(row, ("dataset_options", "patience")) == "\nvocab_size=2000\npatience 3"


def test_a_setting_a_model_does_not_use_is_not_in_its_label():
    """Spline orders vary among the KANs: the plain MLP's bar was grouped under "k=3" (its stored
    default), as if it had one."""
    from kanfarm.reports import _plotdata

    columns = ("spline_order", "dropout")
    kan = {"model": "kan", "trainer": "backprop", "spline_order": 3, "dropout": 0.2}
    mlp = {"model": "mlp", "trainer": "backprop", "spline_order": 3, "dropout": 0.2}
    wide = {"model": "mlp_wide", "trainer": "backprop", "spline_order": 3, "dropout": 0.2}
    assert _plotdata.settings_label(kan, columns) == "\nk=3"
    assert _plotdata.settings_label(mlp, columns) == "\ndropout 0.2"
    assert _plotdata.settings_label(wide, columns) == "\nk=3\ndropout 0.2"  # matched to the KAN of that k


def test_setting_values_sort_as_numbers():
    from kanfarm.reports._plotdata import order_key

    assert sorted([10, 2, 3], key=order_key) == [2, 3, 10]
    assert sorted([128, 64.0, "gelu"], key=order_key) == [64.0, 128, "gelu"]


def test_degree_studies_keep_other_settings_apart(store):
    """A SiLU copy of the degree study with better accuracies must not lend its points to the GELU one."""
    rows = [r for r in store.summary("full") if r["dataset"] == "mnist"]
    silu = [{**r, "run_id": r["run_id"] + 1000, "activation": "silu", "best_test_acc": 0.99} for r in rows]
    fig = F.degree_vs_width(rows + silu)
    assert len(fig.axes) == 4
    titles = sorted({ax.get_title() for ax in fig.axes})
    assert titles == ["mnist (backprop), gelu", "mnist (backprop), silu"]
    gelu_left = next(ax for ax in fig.axes if ax.get_title().endswith("gelu"))
    assert max(max(line.get_ydata()) for line in gelu_left.lines) < 0.99


def test_sensitivity_rows_put_each_kan_next_to_its_mlp_wide(sqlite_url):
    from kanfarm.reports import sensitivity_table

    store = Store(sqlite_url)
    store.upgrade()
    try:
        cells = [RunConfig(dataset="digits", model=m, depth=None, hidden_widths=(w,), activation=a, spline_order=k)
                 for m in ("kan", "mlp_wide") for a in ("gelu", "silu") for k in (2, 3) for w in (16, 8)]
        store.submit_grid("g", {"name": "g"}, [(c, 1000, None) for c in cells])
        for run_id in store.run_ids("g"):
            _finish(store, run_id, [0.2, 0.5])
        order = [(r["hidden_widths"], r["activation"], r["spline_order"], r["model"]) for r in sensitivity_table(store, "g")]
        assert order[:4] == [("8", "gelu", 2, "kan"), ("8", "gelu", 2, "mlp_wide"),
                             ("8", "gelu", 3, "kan"), ("8", "gelu", 3, "mlp_wide")]
        assert [o[0] for o in order] == ["8"] * 8 + ["16"] * 8  # widths as numbers
    finally:
        store.dispose(close=True)


def test_sensitivity_rows_pair_kans_with_mlp_wides_of_default_activations_and_leave_unused_settings_empty(sqlite_url):
    """A KAN (gelu by default) and its MLP-Wide (relu) still stand side by side, per spline order;
    a setting the model does not have (a KAN's dropout, an MLP's spline order, a backprop run's
    HSIC beta) is shown empty, not as the default it is stored with."""
    from kanfarm.reports import sensitivity_table

    store = Store(sqlite_url)
    store.upgrade()
    try:
        cells = [RunConfig(dataset="digits", model=m, spline_order=k, dropout=0.0) for m in ("kan", "mlp_wide")
                 for k in (2, 3)] + [RunConfig(dataset="digits", model="mlp", dropout=0.0)]
        # one network stored twice (before a grid gave a hand-scaled MLP-Wide one cell): one setting
        cells += [RunConfig(dataset="digits", model="mlp_wide", wide_multiplier=2.0, spline_order=k, dropout=0.0)
                  for k in (2, 3)]
        store.submit_grid("g", {"name": "g"}, [(c, 1000, None) for c in cells])
        for run_id in store.run_ids("g"):
            _finish(store, run_id, [0.2, 0.5])
        rows = sensitivity_table(store, "g")
        assert [(r["model"], r["activation"], r["spline_order"], r["runs"]) for r in rows] == [
            ("kan", "gelu", 2, 1), ("mlp_wide", "relu", 2, 1), ("kan", "gelu", 3, 1), ("mlp_wide", "relu", 3, 1),
            ("mlp_wide", "relu", None, 2), ("mlp", "relu", None, 1)]
        assert [r["dropout"] for r in rows] == [None, 0.0, None, 0.0, 0.0, 0.0]
        assert [r["grid_size"] for r in rows] == [5, 5, 5, 5, None, None]
        assert {r["hsic_beta"] for r in rows} == {None}
        assert [r["wide_multiplier"] for r in rows] == [None, None, None, None, 2.0, None]
    finally:
        store.dispose(close=True)


@pytest.mark.parametrize("lo,hi,expected", [(23680, 25400, None), (2410, 23710, None), (2410, 5e6, "10^{4}"),
                                             (23680, 23710, None), (999000, 1001000, "1M")])
def test_a_log_axis_within_a_decade_still_has_numbers(lo, hi, expected):
    """Parameter counts within one decade left the log axis without a single label; a KAN and its
    matched MLP-Wide (within 0.2%) had four ticks all reading "23.7k", and 999k-1.001M read
    "999k, 1e+03k, 1M, 1M"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kanfarm.reports.figures import _log_x

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([lo, hi], [0.9, 0.95], "o")
    _log_x(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in [*ax.get_xticklabels(), *ax.get_xticklabels(minor=True)] if t.get_text()]
    assert 2 <= len(labels) <= 6, labels
    assert len(set(labels)) == len(labels) and not any("e+" in label for label in labels), labels
    if expected:
        assert any(expected in label for label in labels), labels
    else:
        assert all(label[-1] == "k" for label in labels), labels


def test_learning_curves_of_runs_with_only_epoch_0_have_integer_epochs():
    """A zero-width epoch range gave ticks at -0.045 ... 0.045."""
    rows = [{"run_id": 1, "dataset": "digits", "model": "kan", "trainer": "backprop", "depth": "shallow",
             "best_test_acc": 0.1, "optimizer": "adam", "lr": 0.01, "init": "orthogonal", "status": "completed"}]
    fig = F.learning_curves(rows, [{"run_id": 1, "epoch": 0, "train_acc": 0.1, "test_acc": 0.1}])
    fig.canvas.draw()
    (ax,) = fig.axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert 0 in ticks and all(float(t).is_integer() for t in ticks), ticks


def test_bar_figures_are_as_wide_as_their_fullest_panel_and_no_wider_than_the_cap():
    """Widths came from every group of every dataset times every series (9,870 px for the paper
    presets together, when the fullest panel needed a fifth of that), with no upper bound."""
    def run(i, dataset, model, widths):
        return {"run_id": i, "dataset": dataset, "model": model, "trainer": "backprop", "depth": None,
                "hidden_widths": widths, "best_test_acc": 0.5, "status": "completed"}

    rows = [run(i, "a", "kan", str(i + 1)) for i in range(12)] + [run(i, "b", "mlp", str(i + 1)) for i in range(12, 24)]
    assert F.accuracy_bars(rows).get_figwidth() == pytest.approx(1.5 + 0.45 * 12)  # not 0.45 x 24 groups x 2 models
    many = [run(i, "a", "kan", str(i + 1)) for i in range(100)]
    with pytest.raises(F.NoData, match="100 bars in one panel"):
        F.accuracy_bars(many)
    with pytest.raises(F.NoData, match="100 boxes in one panel"):
        F.sensitivity_boxes(many)


def test_cli_plot_and_html_json_list_what_they_wrote(cli, tmp_path):
    import json

    out = tmp_path / "figs"
    result = cli("plot", "--grid", "full", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["grid"] == "full" and info["skipped"] == {}
    assert sorted(info["written"]) == sorted(str(p) for p in out.iterdir())
    result = cli("plot", "--grid", "empty", "--out", str(tmp_path / "none"), "--json")
    info = json.loads(result.stdout)  # the notes go to stderr: stdout stays one JSON object
    assert info["written"] == [] and "trainers" in info["skipped"]
    result = cli("html", "--grid", "empty", "--out", str(tmp_path / "r.html"), "--json")
    assert json.loads(result.stdout) == {"grid": "empty", "written": str(tmp_path / "r.html")}
    assert (tmp_path / "r.html").is_file()
