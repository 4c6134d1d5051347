"""runs filters, show, compare, tag and note, on a store made here (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.store import open_store


def cfg(lr: float, workers: int = 2) -> dict:
    return {"run": {"name": "x", "seed": 0}, "optim": {"lr": lr}, "scaling": {"num_workers": workers}}


@pytest.fixture
def store(home, store_uri, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_STORE", store_uri)  # the commands below read it, as --store would set it
    s = open_store()
    for i, (lr, status) in enumerate([(0.001, "completed"), (0.003, "failed"), (0.001, "completed")]):
        rid = f"r{i}"
        s.create_run(run_id=rid, name=f"exp{i}", config=cfg(lr), git_commit="abc", host="h", command="c",
                     world_size=2, meta={"versions": {"python": "3.11", "torch": "2.13.0"}},
                     tags={"team": "nlp"} if i != 1 else {})
        loss = np.linspace(5.0, 2.0 + i, 50)
        loss[25] = 0.5 if i == 2 else loss[25]  # a dip: best differs from last
        for rank in (0, 1):
            s.points.append(rid, rank, 0, {"train/loss": (np.arange(50), loss),
                                           "train/tokens_per_s": (np.arange(50), np.full(50, 1000.0 * (i + 1)))})
        s.finish_run(rid, status, summary={"last_loss": float(loss[-1])})
    return s


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_runs_filters(store, capsys):
    assert [r["id"] for r in run_json(capsys, ["runs"])] == ["r0", "r1", "r2"]
    assert [r["id"] for r in run_json(capsys, ["runs", "--status", "failed"])] == ["r1"]
    assert [r["id"] for r in run_json(capsys, ["runs", "--tag", "team=nlp"])] == ["r0", "r2"]
    assert [r["id"] for r in run_json(capsys, ["runs", "--tag", "team"])] == ["r0", "r2"]
    assert [r["id"] for r in run_json(capsys, ["runs", "--where", "optim.lr=0.003"])] == ["r1"]
    assert [r["id"] for r in run_json(capsys, ["runs", "--where", "optim.lr=1e-3", "--status", "completed"])] == ["r0", "r2"]


def test_runs_where_unknown_key_is_one_line(store, capsys):
    assert main(["runs", "--where", "optim.lrr=1"]) == 2
    assert "did you mean optim.lr?" in capsys.readouterr().err


def test_compare_config_diff_and_metrics(store, capsys):
    result = run_json(capsys, ["compare", "r0", "r1", "r2"])
    assert result["config_diff"] == {"optim.lr": [0.001, 0.003, 0.001]}
    loss = result["metrics"]["train/loss"]
    assert loss["r0"]["last"] == pytest.approx(2.0) and loss["r2"]["last"] == pytest.approx(4.0)
    assert loss["r2"]["best"] == pytest.approx(0.5)  # best is the minimum for a loss
    assert result["metrics"]["train/tokens_per_s"]["r2"]["best"] == 3000.0  # and the maximum for throughput
    assert result["metrics"]["eval/loss"]["r0"] == {"last": None, "best": None, "last_step": None}
    assert main(["compare", "r0", "r1"]) == 0
    text = capsys.readouterr().out
    assert "config differences" in text and "optim.lr" in text


def test_compare_needs_two_runs(store, capsys):
    assert main(["compare", "r0"]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_tag_and_note_then_show(store, capsys):
    assert main(["tag", "r1", "baseline", "owner=ana"]) == 0
    assert main(["note", "r1", "diverged after lr warmup"]) == 0
    capsys.readouterr()
    shown = run_json(capsys, ["show", "r1"])
    assert shown["tags"] == {"baseline": "", "owner": "ana"}
    assert [n["text"] for n in shown["notes"]] == ["diverged after lr warmup"]
    assert shown["meta"]["versions"]["torch"] == "2.13.0"
    assert main(["show", "r1"]) == 0
    text = capsys.readouterr().out
    assert "owner=ana" in text and "diverged after lr warmup" in text and "torch 2.13.0" in text


def test_show_lists_events(store, capsys):
    store.add_event("r0", kind="loss_spike", severity="warning", message="train/loss 9 at step 25", step=25, rank=0)
    shown = run_json(capsys, ["show", "r0"])
    assert [(e["kind"], e["step"]) for e in shown["events"]] == [("loss_spike", 25)]
    assert main(["show", "r0"]) == 0
    assert "loss_spike: train/loss 9 at step 25" in capsys.readouterr().out


def test_text_metrics_with_sparkline(store, capsys):
    assert main(["metrics", "r2", "--key", "train/loss", "--buckets", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train/loss  ") and "[0.5 .. 5]" in lines[0]
    assert lines[1].split() == ["STEP", "VALUE", "MIN", "MAX"] and len(lines) == 12
