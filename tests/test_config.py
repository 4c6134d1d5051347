"""Config loading: typed sections, defaults, overrides, clear errors, redaction. No Ray, no torch."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from orchestrator.config import Backend, Config, config_from_dict, load_config, redact


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_just_work(tmp_path):
    cfg = load_config(write(tmp_path, "data: {uri: /some/data}\n"))
    assert cfg.scaling.num_workers == 2
    assert cfg.distributed.backend is Backend.AUTO
    assert cfg.run.name == "c"  # the file's stem
    assert cfg.scaling.start_timeout_s == 60


def test_demo_recipe_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.run.name == "demo" and cfg.scaling.num_workers == 2


def test_unknown_key_names_dotted_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "scaling:\n  num_workres: 4\n"))
    msg = str(e.value)
    assert "scaling.num_workres" in msg and "did you mean scaling.num_workers?" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="unknown key scalling; did you mean scaling"):
        load_config(write(tmp_path, "scalling: {num_workers: 4}\n"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("scaling: {num_workers: two}", "scaling.num_workers: expected an integer, got a string 'two'"),
        ("scaling: {num_workers: 0}", "scaling.num_workers: expected a value >= 1, got 0"),
        ("scaling: {num_workers: true}", "scaling.num_workers: expected an integer"),
        ("optim: {beta1: 1.5}", "optim.beta1: expected a value between 0 and 1, got 1.5"),
        ("distributed: {backend: mpi}", "distributed.backend: expected one of ['auto', 'gloo', 'nccl']"),
        ("run: {tags: oops}", "run.tags: expected a list"),
        ("scaling: 3", "scaling: expected a mapping, got int"),
        ("train: {deterministic: 1}", "train.deterministic: expected true/false"),
    ],
)
def test_wrong_type_or_range_names_path_and_expectation(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text + "\n"))
    assert expected in str(e.value)


def test_int_and_exponent_strings_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "optim: {lr: 1}\n")).optim.lr == 1.0
    assert load_config(write(tmp_path, "optim: {lr: 3e-4}\n")).optim.lr == 3e-4  # PyYAML: a string


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_bad_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(write(tmp_path, "run:\n  name: [unclosed\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_parse_values_and_create_sections(tmp_path):
    cfg = load_config(
        write(tmp_path, "scaling: {num_workers: 2}\n"),
        ["scaling.num_workers=4", "optim.lr=1e-4", "run.name=x", "train.deterministic=false", "run.tags=[a, b]",
         "data.global_batch_size=8"],
    )
    assert cfg.scaling.num_workers == 4 and cfg.optim.lr == 1e-4 and cfg.run.name == "x"
    assert cfg.train.deterministic is False and cfg.run.tags == ["a", "b"]


def test_override_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean train.max_steps"):
        load_config(write(tmp_path, ""), ["train.max_step=10"])


def test_override_needs_equals(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(tmp_path, ""), ["train.max_steps"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size=10 must be divisible by scaling.num_workers=4"):
        load_config(write(tmp_path, "scaling: {num_workers: 4}\ndata: {global_batch_size: 10}\n"))
    with pytest.raises(ConfigError, match="d_model=100 must be divisible by model.n_head=3"):
        load_config(write(tmp_path, "model: {d_model: 100, n_head: 3}\n"))
    with pytest.raises(ConfigError, match="expected \"pkg.module:function\""):
        load_config(write(tmp_path, "model: {factory: mymodule}\n"))


def test_round_trip_through_dict():
    cfg = Config()
    cfg.run.name = "r"
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_redaction_of_secret_looking_keys():
    plain = {"model": {"kwargs": {"api_key": "abc", "hidden": 3, "nested": {"wandb_token": "t", "Password": "p"}}},
             "run": {"name": "n", "client_secret": "s"}}
    red = redact(plain)
    assert red["model"]["kwargs"]["api_key"] != "abc"
    assert red["model"]["kwargs"]["nested"]["wandb_token"] != "t"
    assert red["model"]["kwargs"]["nested"]["Password"] != "p"
    assert red["run"]["client_secret"] != "s"
    assert red["model"]["kwargs"]["hidden"] == 3 and red["run"]["name"] == "n"
    assert plain["model"]["kwargs"]["api_key"] == "abc"  # the original is untouched


def test_config_reference_matches_code():
    """docs/CONFIG.md is generated; regenerate with `python -m orchestrator.config_doc`."""
    from pathlib import Path

    from orchestrator.config_doc import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
    assert doc.read_text() == render(), "docs/CONFIG.md is stale: run `python -m orchestrator.config_doc`"
