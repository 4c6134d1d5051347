"""The CLI's contract for bad input: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from orchestrator.store import Store
from tests.conftest import run_cli


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("yaml_text, expected", [
    ("scaling: {num_wrkers: 2}\n", "unknown key scaling.num_wrkers; did you mean scaling.num_workers?"),
    ("train: {max_steps: many}\n", "train.max_steps: expected an integer, got a string 'many'"),
    ("run: [unclosed\n", "invalid YAML at line"),
])
def test_malformed_config_is_one_line(tmp_path, home, capsys, yaml_text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    assert expected in one_line_error(capsys, ["launch", str(cfg)])


def test_missing_config_file(home, capsys):
    assert "config file not found: missing.yaml" in one_line_error(capsys, ["launch", "missing.yaml"])


def test_bad_override(tmp_path, home, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("data: {uri: x}\n")
    assert "did you mean train.max_steps" in one_line_error(capsys, ["launch", str(cfg), "train.maxsteps=3"])


def test_missing_dataset_is_caught_before_ray_starts(tmp_path, home, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"data: {{uri: {tmp_path / 'nodata'}}}\n")
    err = one_line_error(capsys, ["launch", str(cfg)])
    assert "no dataset index here" in err and "orchestrator data prepare" in err


def test_data_uri_required(tmp_path, home, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("run: {name: x}\n")
    assert "data.uri: required" in one_line_error(capsys, ["launch", str(cfg)])


def test_unknown_command_and_missing_argument(home, capsys):
    assert "invalid choice: 'lanch'" in one_line_error(capsys, ["lanch"])
    assert "required: --out" in one_line_error(capsys, ["data", "prepare", "x"])


def test_unknown_run_and_metric(home, capsys, tmp_path):
    store = Store()
    assert "no run 'nope'" in one_line_error(capsys, ["show", "nope"])
    store.create_run(run_id="r1", name="n", config={}, git_commit=None, host="h", command="c", world_size=1)
    store.log_metrics("r1", [("train/loss", 0, 0, 1.0, 0.0)])
    assert "did you mean train/loss?" in one_line_error(capsys, ["metrics", "r1", "--key", "train/los"])
    assert "has no rank 3" in one_line_error(capsys, ["metrics", "r1", "--key", "train/loss", "--rank", "3"])


def test_data_prepare_errors(tmp_path, home, capsys):
    err = one_line_error(capsys, ["data", "prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert "source not found" in err
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    err = one_line_error(capsys, ["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert "less than one sequence" in err


def test_runs_json_contract_on_empty_store(home, capsys):
    assert main(["runs", "--json"]) == 0  # no store at all: an empty list, and no store made
    assert json.loads(capsys.readouterr().out) == [] and not home.exists()
    Store().close()
    assert main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_real_entry_point_prints_one_line(tmp_path, home):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("scaling: {num_workers: -1}\n")
    proc = run_cli("launch", str(cfg), home=home)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"orchestrator: error: {cfg}: scaling.num_workers: expected a value >= 1, got -1"
    ]
