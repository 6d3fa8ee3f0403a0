"""matmul_precision: validated, hashed only when not the default, applied around a run or pack
and restored, and never mixed inside a pack."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from kanfarm.config import ConfigError, RunConfig
from kanfarm.data import load_dataset
from kanfarm.grids import parse_spec
from kanfarm.packing import Member, pack_key, plan_packs, train_pack
from kanfarm.training import train
from kanfarm.training.precision import matmul_precision

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


SPEC = {"name": "p", "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"],
        "inits": ["kaiming_normal"], "optimizers": ["adam", "sgd"], "learning_rates": [0.01]}


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError) as err:
        RunConfig(matmul_precision="bf16").normalised()
    assert err.value.field == "matmul_precision"
    with pytest.raises(ConfigError) as err:
        parse_spec({**SPEC, "matmul_precision": "fp16"})
    assert err.value.field == "matmul_precision"


def test_cli_refuses_a_bad_precision_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text('name = "p"\ndatasets = ["digits"]\nmodels = ["mlp"]\n'
                                     'depths = ["shallow"]\ninits = ["kaiming_normal"]\n'
                                     'optimizers = ["adam"]\nlearning_rates = [0.01]\n'
                                     'matmul_precision = "tf16"\n')
    result = CliRunner().invoke(app, ["grid", "show", "g.toml"])
    assert result.exit_code == 2 and "matmul_precision" in result.output and "tf16" in result.output


def test_only_a_non_default_precision_enters_the_hash():
    base = RunConfig()
    assert dataclasses.replace(base, matmul_precision="float32").config_hash() == base.config_hash()
    assert dataclasses.replace(base, matmul_precision="tf32").config_hash() != base.config_hash()


def test_spec_cells_carry_the_precision_and_round_trip():
    spec = parse_spec({**SPEC, "matmul_precision": "tf32"})
    assert {c.matmul_precision for c in spec.expand()} == {"tf32"}
    assert parse_spec(spec.to_dict()) == spec
    import tomllib
    assert parse_spec(tomllib.loads(spec.to_toml())) == spec
    assert {c.matmul_precision for c in parse_spec(SPEC).expand()} == {"float32"}


def test_packs_never_mix_precisions():
    a = RunConfig(dataset="digits", model="mlp", optimizer="adam")
    b = dataclasses.replace(a, optimizer="sgd")
    t = dataclasses.replace(b, matmul_precision="tf32")
    assert pack_key(a) == pack_key(b) != pack_key(t)
    assert plan_packs([(1, a), (2, t), (3, b)], 8) == [[1, 3], [2]]
    with pytest.raises(ValueError, match="matmul precision"):
        train_pack([Member(a, lambda r: None), Member(t, lambda r: None)], None)


def test_context_sets_and_restores_even_on_error():
    assert torch.get_float32_matmul_precision() == "highest"
    with matmul_precision("tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    with pytest.raises(RuntimeError):
        with matmul_precision("tf32"):
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError):
        with matmul_precision("bf16"):
            pass


@pytest.mark.parametrize("packed", [False, True])
def test_training_runs_at_the_run_precision_and_restores_it(digits, packed):
    seen: list[str] = []

    def sink(record) -> None:
        seen.append(torch.get_float32_matmul_precision())

    config = RunConfig(dataset="digits", model="mlp", hidden_widths=(8,), max_epochs=1,
                       batch_size=256, matmul_precision="tf32")
    if packed:
        train_pack([Member(config, sink), Member(dataclasses.replace(config, lr=0.01), sink)], digits)
    else:
        train(config, digits, sink)
    assert seen and set(seen) == {"high"}
    assert torch.get_float32_matmul_precision() == "highest"
