"""The examples in examples/ run as their READMEs say, on the session's Ray cluster."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO, cli_json, run_cli

pytestmark = pytest.mark.ray

LAUNCHES = {
    "digits": [str(REPO / "examples" / "digits.yaml"), "train.max_steps=200", "checkpoint.every_steps=50"],
    "torchrun": [str(REPO / "examples" / "torchrun_ddp.yaml")],
}


@pytest.fixture(scope="module")
def examples(tmp_path_factory, ray_address):
    """{example: (its launch, its store)}: both launched side by side (2 workers each on the session
    cluster's 4 CPUs: a launch mostly waits), each into a store of its own."""
    def launch(name: str):
        home = tmp_path_factory.mktemp(name) / "home"
        return run_cli("launch", *LAUNCHES[name], "--address", ray_address, home=home, timeout=300), home

    with ThreadPoolExecutor(len(LAUNCHES)) as pool:
        started = {name: pool.submit(launch, name) for name in LAUNCHES}
        return {name: done.result() for name, done in started.items()}


def test_the_digits_function_learns(examples):
    proc, home = examples["digits"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = cli_json("runs", home=home)[-1]["id"]
    acc = cli_json("metrics", run_id, "--key", "eval/accuracy", "--rank", "0", home=home)["points"]
    assert acc and acc[-1]["step"] == 199 and acc[-1]["value"] > 0.85, acc


def test_the_torchrun_script_example_runs_from_its_config(examples):
    proc, home = examples["torchrun"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = cli_json("runs", home=home)[-1]["id"]
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", "0", home=home)["points"]
    assert [p["step"] for p in pts] == list(range(50)) and pts[-1]["value"] < pts[0]["value"]
