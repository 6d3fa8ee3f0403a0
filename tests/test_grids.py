"""Grid specs: presets reproduce the study, expansion is stable, every bad value names its field."""
from __future__ import annotations

import json
import tomllib

import pytest

from conftest import OTHER_VALUES, stored_grids_and_runs
from kanfarm.config import ConfigError, RunConfig
from kanfarm.grids import KNOWN_INTRINSIC_DIM, PRESETS, GridSpec, load_spec, parse_spec

BASE = {
    "name": "t",
    "datasets": ["digits"],
    "models": ["kan", "mlp", "mlp_wide"],
    "depths": ["shallow"],
    "inits": ["kaiming_normal"],
    "optimizers": ["adam"],
    "learning_rates": [0.01],
}

PAPER_BATCH = {"mnist": 4096, "fashion-mnist": 4096, "cifar10": 2048, "imdb": 2000, "higgs": 20000}


def spec(**changes) -> GridSpec:
    data = {**BASE, **changes}
    return parse_spec({k: v for k, v in data.items() if v is not None})


def hashes(s: GridSpec) -> list[str]:
    return [c.config_hash() for c in s.expand()]


# --- presets -------------------------------------------------------------------------------------

EXPECTED_CELLS = {
    **{f"paper-{d}": 243 for d in PAPER_BATCH},
    "paper-hsic-mnist": 243,
    "paper-activations": 45,  # 5 datasets x 3 depths x 3 activations
    "paper-degree": 12,  # 3 widths x 4 spline orders
    "demo": 6,
}


def test_presets_listed_match_files_and_expected():
    assert set(PRESETS) == set(EXPECTED_CELLS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CELLS))
def test_preset_loads_with_expected_cells(name):
    s = load_spec(name)
    assert s.name == name
    cells = s.expand()
    assert len(cells) == EXPECTED_CELLS[name]
    assert len({c.config_hash() for c in cells}) == len(cells)
    assert all(c == c.normalised() for c in cells)


@pytest.mark.parametrize("dataset", sorted(PAPER_BATCH))
def test_paper_grid_matches_study(dataset):
    cells = load_spec(f"paper-{dataset}").expand()
    assert {c.dataset for c in cells} == {dataset}
    assert {c.batch_size for c in cells} == {PAPER_BATCH[dataset]}
    assert {c.max_epochs for c in cells} == {100}
    assert {c.trainer for c in cells} == {"backprop"}
    assert {c.lr for c in cells} == {0.05, 0.005, 0.0005}
    for model in ("kan", "mlp", "mlp_wide"):
        assert sum(c.model == model for c in cells) == 81  # 3 depths x 27 schemes


def test_batch_norm_on_cifar10_only_as_in_the_study():
    """FACTS.md: batch norm was used on CIFAR-10."""
    assert {c.batch_norm for c in load_spec("paper-cifar10").expand()} == {True}
    for name in ("paper-mnist", "paper-fashion-mnist", "paper-imdb", "paper-higgs", "paper-hsic-mnist"):
        assert {c.batch_norm for c in load_spec(name).expand()} == {False}
    assert {(c.dataset, c.batch_norm) for c in load_spec("paper-activations").expand()} == {
        (d, d == "cifar10") for d in PAPER_BATCH}


@pytest.mark.parametrize("value,field", [("yes", "batch_norm"), (1, "batch_norm"),
                                         ({"cifar10": "on"}, "batch_norm.cifar10"),
                                         ({"cifar": True}, "batch_norm.cifar")])
def test_bad_batch_norm_names_the_field(value, field):
    with pytest.raises(ConfigError) as err:
        parse_spec({**BASE, "batch_norm": value})
    assert err.value.field == field


@pytest.mark.parametrize("change,field", [({"name": "g" * 201}, "name"),
                                          ({"widths": [[8] * 101]}, "widths[0]")])
def test_text_longer_than_the_store_holds_names_the_field(change, field):
    """SQLite would store it, PostgreSQL refuse it with a traceback: refused at the spec, on both."""
    with pytest.raises(ConfigError) as err:
        parse_spec({**BASE, **change}).expand()
    assert err.value.field == field
    parse_spec({**BASE, "name": "g" * 200, "widths": [[8] * 100]}).expand()  # 200 characters fit


@pytest.mark.parametrize("change,field", [({"name": "a\nb"}, "name"), ({"name": "a\0b"}, "name"),
                                          ({"name": "tab\there"}, "name"), ({"description": "x\0y"}, "description"),
                                          ({"name": "\u200b"}, "name"), ({"name": "abc\u202edef"}, "name"),
                                          ({"name": "a\u2028b"}, "name")])
def test_a_control_character_in_the_name_or_a_nul_in_the_description_is_refused(change, field):
    """A newline would split every message naming the grid; PostgreSQL's text holds no NUL."""
    with pytest.raises(ConfigError) as err:
        parse_spec({**BASE, **change})
    assert err.value.field == field
    parse_spec({**BASE, "name": "ünïcode grid", "description": "two\nlines\tand a tab"})


def test_a_name_with_a_combining_accent_is_the_precomposed_name():
    """"café" from a macOS file name (e + combining acute) and typed precomposed: one grid."""
    assert parse_spec({**BASE, "name": "cafe\u0301"}).name == "caf\u00e9"


@pytest.mark.parametrize("hsic,field", [({"sigma": 0}, "hsic.sigma"), ({"beta": -1.0}, "hsic.beta"),
                                        ({"sigma": 1e-200}, "hsic.sigma"), ({"sigma": 1e300}, "hsic.sigma"),
                                        ({"sigma": "wide"}, "hsic.sigma"), ({"format_epochs": 0}, "hsic.format_epochs"),
                                        ({"x_term": "yes"}, "hsic.x_term"), ({"gamma": 1}, "hsic.gamma")])
def test_bad_hsic_settings_name_the_spec_field(hsic, field):
    """The spec's own key (``hsic.sigma``), not RunConfig's (``hsic_sigma``): the one the user wrote."""
    with pytest.raises(ConfigError) as err:
        parse_spec({**BASE, "trainers": ["hsic"], "hsic": hsic})
    assert err.value.field == field


def test_a_width_equal_to_a_listed_depth_is_that_depth_s_cell():
    """digits' shallow preset is [32]: ``widths = [[32]]`` next to ``depths = ["shallow"]`` names the
    same network, which must train once (under the depth's label), for every model."""
    spec = parse_spec({**BASE, "datasets": ["digits"], "models": ["kan", "mlp", "mlp_wide"],
                       "depths": ["shallow"], "widths": [[32], [16]]})
    cells = [(c.model, c.depth, c.hidden_widths) for c in spec.expand()]
    assert [(model, depth) for model, depth, _ in cells] == [
        ("kan", "shallow"), ("kan", None), ("mlp", "shallow"), ("mlp", None), ("mlp_wide", "shallow"),
        ("mlp_wide", None)]
    assert [widths for model, depth, widths in cells if model == "kan"] == [(32,), (16,)]
    assert len({c.config_hash() for c in spec.expand()}) == 6
    alone = parse_spec({**BASE, "datasets": ["digits"], "models": ["kan"], "depths": [], "widths": [[32]]})
    assert [c.depth for c in alone.expand()] == [None]  # without the depth, the width cell stays


def test_paper_intrinsic_dims():
    assert load_spec("paper-mnist").intrinsic_dim("mnist") == 750
    assert load_spec("paper-cifar10").intrinsic_dim("cifar10") == 9000
    for d in ("fashion-mnist", "imdb", "higgs"):
        assert load_spec(f"paper-{d}").intrinsic_dim(d) == 0
        assert load_spec("paper-activations").intrinsic_dim(d) == 0
    assert load_spec("demo").intrinsic_dim("digits") == 0
    assert spec().intrinsic_dim("digits") is None
    assert KNOWN_INTRINSIC_DIM == {"mnist": 750, "cifar10": 9000}


def test_activation_preset_uses_per_dataset_batch_sizes():
    cells = load_spec("paper-activations").expand()
    assert {(c.dataset, c.batch_size) for c in cells} == set(PAPER_BATCH.items())
    assert {c.activation for c in cells} == {"gelu", "elu", "silu"}
    assert {(c.init, c.optimizer, c.lr, c.model) for c in cells} == {("kaiming_normal", "adam", 0.0005, "kan")}


def test_degree_and_hsic_presets():
    cells = load_spec("paper-degree").expand()
    assert {c.hidden_widths for c in cells} == {(32,), (64,), (128,)}
    assert {c.spline_order for c in cells} == {2, 3, 4, 5}
    assert {c.lr for c in cells} == {0.0001}
    hsic = load_spec("paper-hsic-mnist")
    backprop = load_spec("paper-mnist")
    assert {c.trainer for c in hsic.expand()} == {"hsic"}
    # same grid apart from the trainer and dropout (none for HSIC: it drowns the class signal)
    assert {c.dropout for c in hsic.expand() if c.model != "kan"} == {0.0}
    # FACTS.md: the output layer is trained after HSIC training (the "format" stage)
    assert {(c.hsic_format_epochs, c.hsic_x_term, c.hsic_beta) for c in hsic.expand()} == {(10, False, 100.0)}
    strip = lambda c: repr({**c.to_dict(), "trainer": None, "dropout": None, "hsic_format_epochs": None})  # noqa: E731
    # compared as one string each: a failing diff of 243 dicts would take pytest minutes to render
    assert "\n".join(map(strip, hsic.expand())) == "\n".join(map(strip, backprop.expand()))


# --- loading -------------------------------------------------------------------------------------

def test_load_from_file_uses_stem_as_default_name(tmp_path):
    path = tmp_path / "my-grid.toml"
    path.write_text('datasets = ["digits"]\nmodels = ["kan"]\ndepths = ["shallow"]\n'
                    'inits = ["orthogonal"]\noptimizers = ["sgd"]\nlearning_rates = [0.1]\n')
    s = load_spec(str(path))
    assert s.name == "my-grid"
    assert len(s.expand()) == 1
    path.write_text('name = "other"\n' + path.read_text())
    assert load_spec(str(path)).name == "other"


def test_unknown_preset_or_missing_file_lists_presets(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_spec("paper-mnsit")
    assert err.value.field == "spec" and "paper-mnist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_spec(str(tmp_path / "nope.toml"))
    assert err.value.field == "spec" and "demo" in str(err.value)


def test_bad_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("datasets = [\n")
    with pytest.raises(ConfigError) as err:
        load_spec(str(path))
    assert err.value.field == "spec"


# --- expansion -----------------------------------------------------------------------------------

def test_expansion_is_the_same_in_every_process():
    """Run order and hashes must not depend on Python's per-process string hashing (a set or a
    dict keyed by strings iterated during expansion would): two interpreters with different
    PYTHONHASHSEED expand the grid as this one does."""
    import os
    import subprocess
    import sys

    script = ("from kanfarm.grids import load_spec; "
              "print(' '.join(c.config_hash() for c in load_spec('paper-mnist').expand()))")
    here = " ".join(hashes(load_spec("paper-mnist")))
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == here


def test_expansion_order_outermost_first():
    cells = spec(learning_rates=[0.01, 0.001], seeds=[0, 1], models=["kan", "mlp"]).expand()
    assert [(c.model, c.lr, c.seed) for c in cells] == [
        ("kan", 0.01, 0), ("kan", 0.01, 1), ("kan", 0.001, 0), ("kan", 0.001, 1),
        ("mlp", 0.01, 0), ("mlp", 0.01, 1), ("mlp", 0.001, 0), ("mlp", 0.001, 1),
    ]


def test_shared_cell_has_one_hash_across_specs():
    demo_kan = next(c for c in load_spec("demo").expand() if c.model == "kan" and c.lr == 0.01)
    other = spec(name="other", models=["kan"], learning_rates=[0.01], epochs=15,
                 spline_orders=[3, 4], hsic={"beta": 5.0}, wide_multiplier=2.0)
    assert demo_kan.config_hash() in hashes(other)
    assert demo_kan.config_hash() == RunConfig(dataset="digits", lr=0.01, max_epochs=15).config_hash()


def test_extending_a_grid_keeps_existing_hashes_and_adds_only_new():
    small = hashes(spec(learning_rates=[0.01], seeds=[0]))
    big = hashes(spec(learning_rates=[0.01, 0.001], seeds=[0, 1], spline_orders=[3, 2],
                      trainers=["backprop", "hsic"], depths=["shallow", "deep"]))
    assert set(small) <= set(big)
    assert len(set(big) - set(small)) == len(big) - len(small)


def test_mlp_not_duplicated_over_spline_axes():
    cells = spec(spline_orders=[2, 3, 4], grid_sizes=[5, 8]).expand()
    per_model = {m: [c for c in cells if c.model == m] for m in ("kan", "mlp", "mlp_wide")}
    assert len(per_model["kan"]) == len(per_model["mlp_wide"]) == 6
    assert len(per_model["mlp"]) == 1
    assert len({c.config_hash() for c in cells}) == len(cells) == 13


def test_per_dataset_batch_size_table():
    s = spec(datasets=["digits", "mnist", "cifar10"], batch_size={"mnist": 4096, "default": 32})
    sizes = {(c.dataset, c.batch_size) for c in s.expand()}
    assert sizes == {("digits", 32), ("mnist", 4096), ("cifar10", 32)}
    with pytest.raises(ConfigError) as err:
        spec(datasets=["digits", "mnist"], batch_size={"mnist": 4096})
    assert err.value.field == "batch_size.digits"


def test_widths_and_depths_both_expand():
    cells = spec(models=["kan"], depths=["shallow"], widths=[[16], [64, 32]]).expand()
    assert [(c.depth, c.hidden_widths) for c in cells] == [("shallow", (32,)), (None, (16,)), (None, (64, 32))]


def test_activations_default_per_model():
    cells = spec().expand()
    assert {c.model: c.activation for c in cells} == {"kan": "gelu", "mlp": "relu", "mlp_wide": "relu"}


def test_wide_multiplier_and_hsic_only_where_they_matter():
    cells = spec(wide_multiplier=2.0, trainers=["backprop", "hsic"], hsic={"beta": 50.0}).expand()
    assert {c.model for c in cells if c.wide_multiplier == 2.0} == {"mlp_wide"}
    assert {c.trainer for c in cells if c.hsic_beta == 50.0} == {"hsic"}


# --- round trips and describe --------------------------------------------------------------------

def test_to_dict_json_and_toml_round_trips():
    for name in ("paper-activations", "paper-degree", "paper-hsic-mnist"):
        s = load_spec(name)
        assert parse_spec(json.loads(json.dumps(s.to_dict()))) == s
        again = parse_spec(tomllib.loads(s.to_toml()))
        assert again == s and hashes(again) == hashes(s)
    odd = spec(patience=3, train_eval_size=500, wide_multiplier=1.5, intrinsic_dim={"digits": 40},
               hsic={"format_epochs": 4, "x_term": True}, description='quote " here, DEL \x7f, emoji \U0001f600')
    assert parse_spec(tomllib.loads(odd.to_toml())) == odd
    beyond = parse_spec({**BASE, "name": "emoji \U0001f600"})  # JSON would write a surrogate pair
    assert parse_spec(tomllib.loads(beyond.to_toml())) == beyond


def test_describe():
    d = load_spec("paper-mnist").describe(sample=4)
    assert d["cells"] == 243
    assert d["per_model"] == {"kan": 81, "mlp": 81, "mlp_wide": 81}
    assert d["axes"]["learning_rates"] == 3 and d["axes"]["depths"] == 3
    assert len(d["sample"]) == 4 and all(isinstance(c, dict) for c in d["sample"])
    RunConfig.from_dict(d["sample"][-1])
    json.dumps(d)
    assert load_spec("demo").describe(sample=0)["sample"] == []


# --- validation: every error names its field -----------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"colour": "red"}, "colour"),
    ({"optimizers": ["adam", "adamw"]}, "optimizers[1]"),
    ({"models": []}, "models"),
    ({"seeds": []}, "seeds"),
    ({"learning_rates": None}, "learning_rates"),
    ({"learning_rates": 0.01}, "learning_rates"),
    ({"learning_rates": [0.01, "fast"]}, "learning_rates[1]"),
    ({"learning_rates": [0.01, 0.01]}, "learning_rates[1]"),
    ({"seeds": [0, True]}, "seeds[1]"),
    ({"spline_orders": [3, 0]}, "spline_orders[1]"),
    ({"datasets": ["digits", "mnits"]}, "datasets[1]"),
    ({"depths": ["huge"]}, "depths[0]"),
    ({"depths": [], "widths": []}, "depths"),
    ({"widths": [[32, -1]]}, "widths[0][1]"),
    ({"widths": [32]}, "widths[0]"),
    ({"activations": ["tanh"]}, "activations[0]"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": "big"}, "batch_size"),
    ({"batch_size": {"mnsit": 2}}, "batch_size.mnsit"),
    ({"dropout": 1.0}, "dropout"),
    ({"patience": 1.5}, "patience"),
    ({"wide_multiplier": -2}, "wide_multiplier"),
    ({"intrinsic_dim": {"digits": -1}}, "intrinsic_dim.digits"),
    ({"hsic": {"gamma": 1}}, "hsic.gamma"),
    ({"hsic": {"x_term": "no"}}, "hsic.x_term"),
    ({"name": ""}, "name"),
])
def test_validation_names_field(changes, field):
    data = {**BASE, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        parse_spec(data)
    assert err.value.field == field


def test_unknown_key_lists_allowed_and_bad_value_lists_choices():
    with pytest.raises(ConfigError, match="allowed: .*learning_rates"):
        spec(learnig_rates=[0.1])
    with pytest.raises(ConfigError, match=r"optimizers\[1\]: 'adamw' is not one of sgd, sgd_momentum, adam"):
        spec(optimizers=["adam", "adamw"])


def test_name_from_caller_when_spec_has_none():
    data = {k: v for k, v in BASE.items() if k != "name"}
    assert parse_spec(data, name="given").name == "given"
    with pytest.raises(ConfigError) as err:
        parse_spec(data)
    assert err.value.field == "name"


def test_huge_grid_refused():
    with pytest.raises(ConfigError) as err:
        spec(seeds=list(range(40_000)), learning_rates=[0.1, 0.01, 0.001])
    assert err.value.field == "spec"


def test_documented_example_parses():
    """docs/grid-spec.md's full example stays valid."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "grid-spec.md").read_text()
    example = re.findall(r"```toml\n(.*?)```", text, re.S)[0]
    s = parse_spec(tomllib.loads(example))
    assert s.name == "my-study" and s.intrinsic_dim("digits") == 40
    assert len(s.expand()) == 2 * 3 * 5 * 27 * 2  # datasets x models x architectures x schemes x seeds


# --- integers the store cannot hold -------------------------------------------------------------

BIG = 2**63


@pytest.mark.parametrize("changes, field", [
    ({"seeds": [BIG]}, "seeds[0]"),
    ({"seeds": [0, 2**31]}, "seeds[1]"),
    ({"batch_size": BIG}, "batch_size"),
    ({"batch_size": {"default": BIG}}, "batch_size.default"),
    ({"epochs": BIG}, "epochs"),
    ({"grid_sizes": [2**31]}, "grid_sizes[0]"),
    ({"spline_orders": [BIG]}, "spline_orders[0]"),
    ({"patience": BIG}, "patience"),
    ({"train_eval_size": BIG}, "train_eval_size"),
    ({"hsic": {"format_epochs": BIG}}, "hsic.format_epochs"),
    ({"widths": [[32, BIG]]}, "widths[0][1]"),
    ({"intrinsic_dim": {"digits": BIG}}, "intrinsic_dim.digits"),
    ({"wide_multiplier": 1e200}, "wide_multiplier"),
])
def test_integers_too_large_for_the_store_name_their_field(changes, field):
    with pytest.raises(ConfigError) as err:
        spec(**changes)
    assert err.value.field == field and "2147483647" in str(err.value)


def test_largest_storable_integers_pass():
    s = spec(seeds=[2**31 - 1], batch_size=2**31 - 1, epochs=2**31 - 1, models=["kan"])
    assert s.expand()[0].seed == 2**31 - 1


@pytest.mark.parametrize("field, value", [("seed", BIG), ("max_epochs", 2**31), ("hidden_widths", (2**31,)),
                                          ("train_eval_size", BIG), ("hsic_format_epochs", BIG)])
def test_run_config_bounds_stored_integers(field, value):
    trainer = "hsic" if field.startswith("hsic") else "backprop"  # other trainers reset HSIC fields
    with pytest.raises(ConfigError) as err:
        RunConfig(trainer=trainer, **{field: value}).normalised()
    assert err.value.field == field


@pytest.mark.parametrize("changes, field", [
    ({"models": ["kan"], "depths": [], "widths": [[2**31 - 1] * 4]}, "widths"),
    ({"models": ["mlp_wide"], "depths": [], "widths": [[2**31 - 1] * 4]}, "widths"),  # matching: no hang
    ({"models": ["mlp_wide"], "depths": [], "widths": [[2**20] * 4], "wide_multiplier": 2000.0}, "wide_multiplier"),
    ({"models": ["kan"], "depths": [], "widths": [[2**20] * 4], "grid_sizes": [2**31 - 1]}, "grid_sizes"),
    ({"models": ["mlp_wide"], "depths": [], "widths": [[2**20] * 4], "grid_sizes": [2**31 - 1]}, "grid_sizes"),
    ({"models": ["kan"], "depths": [], "widths": [[2**20] * 4], "spline_orders": [2**31 - 1]}, "spline_orders"),
])
def test_parameter_count_too_large_for_the_store_names_its_field(changes, field):
    from kanfarm.submission import sized_cells

    with pytest.raises(ConfigError) as err:
        sized_cells(spec(**changes))
    assert err.value.field == field


def test_only_the_shape_fields_change_a_cells_parameter_count():
    """``sized_cells`` counts parameters once per SHAPE_FIELDS (and dataset options): a field outside
    them that changed the count would give cells of another shape a wrong ``n_params``."""
    import dataclasses

    from kanfarm.data import dataset_shape
    from kanfarm.models import param_count
    from kanfarm.submission import SHAPE_FIELDS

    def count(config):
        return param_count(config, *dataset_shape(config.dataset, **config.dataset_options))

    for base in (RunConfig(dataset="higgs", model="kan", depth="shallow", trainer="hsic"),
                 RunConfig(dataset="imdb", model="mlp_wide", depth="medium")):
        assert sorted(OTHER_VALUES) == sorted(f.name for f in dataclasses.fields(RunConfig))
        for name, value in OTHER_VALUES.items():
            if name not in SHAPE_FIELDS + ("dataset_options",):
                assert count(dataclasses.replace(base, **{name: value})) == count(base), (base.model, name)


def test_to_dict_and_normalised_hash_are_the_plain_ones():
    """Written out for speed: to_dict is dataclasses.asdict (a deep copy), normalised_hash the
    config_hash of a normalised config."""
    import dataclasses

    configs = [c for name in ("demo", "paper-imdb", "paper-degree") for c in load_spec(name).expand()]
    configs.append(RunConfig(extra={"a": [1, {"b": 2}]}, dataset_options={}))
    for config in configs:
        plain = dataclasses.asdict(config)
        plain["hidden_widths"] = list(config.hidden_widths)
        assert config.to_dict() == plain
        assert config.normalised().normalised_hash() == config.config_hash()
    copied = configs[-1].to_dict()
    copied["extra"]["a"][1]["b"] = 3
    assert configs[-1].extra == {"a": [1, {"b": 2}]}


def test_sized_cells_count_each_cell_as_param_count_does():
    from kanfarm.data import dataset_shape
    from kanfarm.models import param_count
    from kanfarm.submission import sized_cells

    for name in PRESETS:  # widths, depths, spline orders, batch norm, dataset options
        cells = sized_cells(load_spec(name))
        assert len({n for _, n, _ in cells}) > 1
        for config, n_params, _ in cells:
            assert n_params == param_count(config, *dataset_shape(config.dataset, **config.dataset_options))


def test_cli_submit_refuses_huge_integers_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    db = tmp_path / "k.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{db}")
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    cases = {"seeds = [9223372036854775808]": "seeds[0]", "batch_size = 9223372036854775808": "batch_size",
             "epochs = 9223372036854775808": "epochs",
             'models = ["mlp_wide"]\nwide_multiplier = 1e200': "wide_multiplier"}
    for i, (line, field) in enumerate(cases.items()):
        path = tmp_path / f"big{i}.toml"
        path.write_text('name = "big"\ndatasets = ["digits"]\ndepths = ["shallow"]\ninits = ["kaiming_normal"]\n'
                        'optimizers = ["adam"]\nlearning_rates = [0.01]\n'
                        + ("" if "models" in line else 'models = ["kan"]\n') + line + "\n")
        for command in ("show", "submit"):
            result = runner.invoke(app, ["grid", command, str(path)])
            assert result.exit_code == 2, result.output
            assert f"invalid {field}:" in result.output and "Traceback" not in result.output
    assert stored_grids_and_runs(db) == (0, 0)


@pytest.mark.parametrize("text", ["epochs = " + "9" * 5000, "x = " + "[" * 3000 + "]" * 3000])
def test_toml_that_python_cannot_hold_is_a_config_error(tmp_path, text):
    from kanfarm.config import ConfigError
    from kanfarm.grids import load_spec

    (tmp_path / "s.toml").write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_spec(str(tmp_path / "s.toml"))
    assert err.value.field == "spec"


@pytest.mark.parametrize("changes, field", [
    ({"batch_size": {"digits": 1}, "batch_norm": {"digits": True}}, "batch_size.digits"),
    ({"batch_size": {"default": 1}, "batch_norm": True}, "batch_size.default"),
    ({"batch_size": 1, "batch_norm": True}, "batch_size"),
])
def test_a_cell_error_names_the_per_dataset_entry_that_caused_it(changes, field):
    from kanfarm.config import ConfigError

    with pytest.raises(ConfigError) as err:
        spec(datasets=["digits"], **changes)
    assert err.value.field == field


def test_an_mlp_wide_scaled_by_hand_is_one_cell_whatever_the_spline_settings():
    """With a wide_multiplier the MLP-Wide matches no KAN: spline order and grid size change
    nothing in it, so they must not make four identical runs."""
    grid = parse_spec({**BASE, "models": ["mlp_wide", "kan"], "spline_orders": [2, 3], "grid_sizes": [4, 5],
                       "wide_multiplier": 2.0, "inits": ["kaiming_normal"], "optimizers": ["adam"],
                       "learning_rates": [0.01], "seeds": [0]})
    cells = grid.expand()
    wide = [c for c in cells if c.model == "mlp_wide"]
    assert len(wide) == 1 and (wide[0].spline_order, wide[0].grid_size) == (3, 5)
    assert len([c for c in cells if c.model == "kan"]) == 4 * len(grid.depths or [None])
    shown = grid.describe(sample=len(cells))["sample"]
    assert [(c["spline_order"], c["dropout"]) for c in shown if c["model"] == "mlp_wide"] == [(None, 0.2)]
    assert {c["dropout"] for c in shown if c["model"] == "kan"} == {None}


def test_the_cell_cap_counts_the_cells_there_are():
    """MLPs have no splines: 5 orders x 20 grid sizes of an MLP grid are one cell each, and the cap
    (100,000 cells) and its message count them so (it said 800,000 for an 8,000-cell grid)."""
    many = {"models": ["mlp"], "spline_orders": [1, 2, 3, 4, 5], "grid_sizes": list(range(1, 21)),
            "seeds": list(range(8000))}
    assert len(spec(**many).expand()) == 8000
    assert spec(**many).cell_count_bound() == 8000
    over = {**many, "models": ["mlp", "mlp_wide"], "grid_sizes": [5], "spline_orders": [3, 4],
            "seeds": list(range(33367))}  # 1 + 2 cells per seed: 100,101
    with pytest.raises(ConfigError, match="100101 cells is more than 100000"):
        spec(**over)
