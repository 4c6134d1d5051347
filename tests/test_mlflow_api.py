"""The real MLflow client (mlflow-skinny) logging into our store: `orchestrator server` (started
in-process) hands /api/2.0/mlflow/... to orchestrator/ui/mlflow_api.py."""

from __future__ import annotations

import json
import math
import time
import urllib.request

import pytest

from orchestrator.store import Store
from orchestrator.ui import mlflow_search as search
from orchestrator.ui.mlflow_api import MlflowApi, experiment_id_of
from orchestrator.ui.server import start_in_thread
from tests.conftest import cli_json

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402


@pytest.fixture
def tracking(home, monkeypatch):
    """(store, api, uri): a fresh store in $ORCHESTRATOR_HOME, our server on a free loopback port
    over it, and the MLflow client pointed at the server."""
    store = Store(home)
    server, _ = start_in_thread(host="127.0.0.1", port=0, store=store)
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an error is an answer, not a reason to retry
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # the client remembers the last test's experiment, unknown to this store
    try:
        yield store, server.mlflow, uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        server.shutdown()
        server.server_close()
        store.close()


def call(api: MlflowApi, method: str, endpoint: str, body: dict | None = None, query: dict | None = None):
    return api.handle(method, f"/api/2.0/mlflow/{endpoint}", {k: [str(v)] for k, v in (query or {}).items()},
                      json.dumps(body or {}).encode())


LOSS = [(step, 1.0 / (step + 1)) for step in range(120)]
SPIKE_STEP, SPIKE = 77, 50.0


def test_the_mlflow_client_logs_into_our_store(tracking, home):
    store, _, _ = tracking
    before = int(time.time() * 1000)
    mlflow.set_experiment("vision")
    with mlflow.start_run(run_name="resnet") as run:
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"layers": 4, "optimizer": "adam"})
        for step, value in LOSS:  # one call per point, as a training loop would
            mlflow.log_metric("train/loss", SPIKE if step == SPIKE_STEP else value, step=step)
        mlflow.log_metrics({"eval/acc": 0.75, "eval/f1": float("nan")}, step=119)
        mlflow.set_tag("team", "perception")
    after = int(time.time() * 1000)
    run_id = run.info.run_id

    # the MLflow side: history, run, search
    client = MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    expected = [(s, SPIKE if s == SPIKE_STEP else v) for s, v in LOSS]
    assert len(history) == len(expected) > 0
    assert [(m.step, m.value) for m in history] == expected
    stamps = [m.timestamp for m in history]
    assert all(before <= t <= after for t in stamps) and stamps == sorted(stamps)  # the client's own timestamps
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "resnet"
    assert got.info.experiment_id == experiment_id_of("vision")
    assert got.data.params == {"lr": "0.01", "layers": "4", "optimizer": "adam"}
    assert got.data.metrics["train/loss"] == LOSS[-1][1] and got.data.metrics["eval/acc"] == 0.75
    assert math.isnan(got.data.metrics["eval/f1"])
    assert got.data.tags["team"] == "perception" and got.data.tags["mlflow.runName"] == "resnet"
    found = client.search_runs([got.info.experiment_id], "metrics.`eval/acc` > 0.5 and params.optimizer = 'adam'")
    assert [r.info.run_id for r in found] == [run_id]
    assert client.search_runs([got.info.experiment_id], "params.optimizer = 'sgd'") == []

    # our side: the same points, a spike a bucketed read keeps, the run in runs/show/metrics
    run_row = store.run(run_id)
    assert run_row["status"] == "completed" and run_row["name"] == "resnet"
    assert run_row["config"] == {"lr": "0.01", "layers": "4", "optimizer": "adam"}
    ours = store.series(run_id, "train/loss", rank=0)
    assert [(p["step"], p["value"]) for p in ours] == expected
    buckets = store.buckets(run_id, "train/loss", 8)
    assert len(buckets) == 8 and max(b["max"] for b in buckets) == SPIKE
    listed = {r["id"]: r for r in store.runs()}  # what `orchestrator runs` lists
    assert listed[run_id]["status"] == "completed" and listed[run_id]["tags"]["mlflow.experiment"] == "vision"
    metrics = cli_json("metrics", run_id, "--key", "train/loss", "--buckets", "10", home=home)
    assert len(metrics["points"]) == 10 and max(p["max"] for p in metrics["points"]) == SPIKE


def test_runs_compare_and_show_in_the_ui(tracking, home):
    _, _, uri = tracking
    ids = []
    for lr in ("0.1", "0.01"):
        with mlflow.start_run(run_name=f"lr{lr}") as run:
            mlflow.log_param("lr", lr)
            mlflow.log_metrics({"train/loss": float(lr)}, step=3)
        ids.append(run.info.run_id)
    result = cli_json("compare", *ids, "--key", "train/loss", home=home)
    assert result["config_diff"] == {"lr": ["0.1", "0.01"]}
    assert [result["metrics"]["train/loss"][i]["last"] for i in ids] == [0.1, 0.01]

    with urllib.request.urlopen(f"{uri}/api/runs", timeout=60) as r:  # the UI's runs table
        rows = json.loads(r.read())
    rows = rows["runs"] if isinstance(rows, dict) else rows
    assert {r["id"] for r in rows} >= set(ids)
    with urllib.request.urlopen(f"{uri}/api/run/{ids[0]}/metric?key=train/loss&buckets=10", timeout=60) as r:
        assert json.loads(r.read())["points"][0]["max"] == 0.1


def test_a_step_logged_twice_keeps_both_values(tracking):
    store, _, _ = tracking
    with mlflow.start_run() as run:
        for value in (1.0, 2.0, 3.0):
            mlflow.log_metric("score", value)  # no step: MLflow logs each at step 0
        mlflow.log_metric("score", 9.0, step=1)
    history = MlflowClient().get_metric_history(run.info.run_id, "score")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (0, 2.0), (0, 3.0), (1, 9.0)]
    assert [(p["step"], p["value"]) for p in store.series(run.info.run_id, "score", rank=0)] == [(0, 3.0), (1, 9.0)]
    assert MlflowClient().get_run(run.info.run_id).data.metrics["score"] == 9.0


def test_status_mapping(tracking):
    store, _, _ = tracking
    expected = {"FAILED": "failed", "KILLED": "stopped", "FINISHED": "completed"}
    for mlflow_status, ours in expected.items():
        with mlflow.start_run() as run:
            assert store.run(run.info.run_id)["status"] == "running"
            mlflow.end_run(status=mlflow_status)
        assert store.run(run.info.run_id)["status"] == ours
        assert MlflowClient().get_run(run.info.run_id).info.status == mlflow_status


def test_errors_are_mlflow_errors(tracking):
    _, api, _ = tracking
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.1")
        with pytest.raises(MlflowException) as e:
            mlflow.log_param("lr", "0.2")  # MLflow's params never change
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "lr" in e.value.message
        with pytest.raises(MlflowException) as e:
            mlflow.log_metric("bad name!", 1.0)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "bad name!" in e.value.message
    with pytest.raises(MlflowException) as e:
        client.delete_run(run.info.run_id)
    assert e.value.error_code == "NOT_IMPLEMENTED" and "runs/delete" in e.value.message
    with pytest.raises(MlflowException) as e:
        client.get_run("no-such-run")
    assert e.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException) as e:
        client.search_runs(["0"], "params.a IN ('x', 'y')")
    assert e.value.error_code == "NOT_IMPLEMENTED" and "IN" in e.value.message

    # straight at the API: what a client other than MLflow's could send
    code, body = call(api, "POST", "registered-models/create", {"name": "m"})
    assert code == 501 and body["error_code"] == "NOT_IMPLEMENTED" and "registered-models/create" in body["message"]
    code, body = api.handle("POST", "/api/2.0/mlflow/runs/log-metric", {}, b"{not json")
    assert code == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "JSON" in body["message"]
    code, body = call(api, "POST", "runs/log-metric", {"run_id": run.info.run_id, "key": "x", "value": "abc"})
    assert code == 400 and "number" in body["message"]
    code, body = call(api, "POST", "runs/log-metric", {"run_id": run.info.run_id, "key": "x", "value": 1, "step": 1.5})
    assert code == 400 and "step" in body["message"]
    code, body = call(api, "POST", "runs/log-batch", {"run_id": run.info.run_id,
                                                      "metrics": [{"key": f"k{i}", "value": 1} for i in range(1001)]})
    assert code == 400 and "1000" in body["message"]
    code, body = call(api, "GET", "runs/log-metric")
    assert code == 405 and "POST" in body["message"]
    code, body = call(api, "GET", "metrics/get-history", query={"run_id": run.info.run_id})
    assert code == 400 and "metric_key" in body["message"]


def test_experiments(tracking, home):
    store, api, _ = tracking
    client = MlflowClient()
    eid = client.create_experiment("empty-for-now", tags={"owner": "ana"})
    with pytest.raises(MlflowException) as e:
        client.create_experiment("empty-for-now")
    assert e.value.error_code == "RESOURCE_ALREADY_EXISTS"
    names = {x.name for x in client.search_experiments()}
    assert {"Default", "empty-for-now"} <= names
    assert [x.name for x in client.search_experiments(filter_string="name LIKE 'empty%'")] == ["empty-for-now"]
    # a restarted server (a new API over the same store) still knows the experiment, by name and by id
    again = MlflowApi(Store(home))
    code, body = call(again, "GET", "experiments/get-by-name", query={"experiment_name": "empty-for-now"})
    assert code == 200 and body["experiment"]["experiment_id"] == eid
    assert {t["key"]: t["value"] for t in body["experiment"]["tags"]} == {"owner": "ana"}
    code, body = call(again, "GET", "experiments/get", query={"experiment_id": "12345"})
    assert code == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert not any(r["id"].startswith("#") for r in store.runs())  # the registry is not a run


def test_launched_runs_are_readable_not_writable(tracking):
    store, api, _ = tracking
    store.create_run(run_id="launched", name="gpt", config={"optim": {"lr": 0.001}, "run": {"name": "gpt"}},
                     git_commit=None, host="h", command="orchestrator launch x.yaml", world_size=2)
    store.log_metrics("launched", [("train/loss", s, r, 2.0 - 0.01 * s + r, 0.0) for s in range(10) for r in (0, 1)])
    run = MlflowClient().get_run("launched")
    assert run.info.experiment_id == "0" and run.data.params["optim.lr"] == "0.001"
    assert run.data.metrics["train/loss"] == pytest.approx(2.0 - 0.09)  # rank 0's latest
    history = MlflowClient().get_metric_history("launched", "train/loss")
    assert [m.step for m in history] == list(range(10))
    code, body = call(api, "POST", "runs/log-metric", {"run_id": "launched", "key": "x", "value": 1.0})
    assert code == 400 and "not created through MLflow" in body["message"]
    assert "x" not in store.metric_keys("launched")


def test_bulk_interval_keeps_the_spike(tracking):
    _, api, _ = tracking
    with mlflow.start_run() as run:
        MlflowClient().log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric("m", SPIKE if s == SPIKE_STEP else 0.0, 1000 + s, s) for s in range(1000)])
    code, body = call(api, "GET", "metrics/get-history-bulk-interval",
                      query={"run_ids": run.info.run_id, "metric_key": "m", "max_results": 40})
    assert code == 200 and 0 < len(body["metrics"]) <= 40
    assert max(m["value"] for m in body["metrics"]) == SPIKE
    assert all(m["run_id"] == run.info.run_id for m in body["metrics"])


def test_filter_parsing():
    conds = search.parse_filter("metrics.loss < 0.5 and params.lr = '0.01' AND tags.`a b` LIKE 'x%' and status != 'FAILED'")
    assert conds == [("metrics", "loss", "<", 0.5), ("params", "lr", "=", "0.01"), ("tags", "a b", "LIKE", "x%"),
                     ("attributes", "status", "!=", "FAILED")]
    run = {"info": {"status": "FINISHED"}, "data": {"metrics": [{"key": "loss", "value": 0.25}],
                                                   "params": [{"key": "lr", "value": "0.01"}],
                                                   "tags": [{"key": "a b", "value": "xyz"}]}}
    assert search.matches(run, conds)
    assert not search.matches(run, search.parse_filter("metrics.loss >= 0.5"))
    assert not search.matches(run, search.parse_filter("metrics.missing < 1"))
    for bad in ("metrics.loss <", "metrics.loss < 'a'", "params.lr > '1'", "nonsense.x = 1", "metrics.loss = 1 and"):
        with pytest.raises(search.BadFilter):
            search.parse_filter(bad)
    for unsupported in ("metrics.a = 1 OR metrics.b = 2", "params.a IN ('x')", "datasets.name = 'd'"):
        with pytest.raises(search.NotSupported):
            search.parse_filter(unsupported)
    runs = [{"info": {"start_time": t}, "data": {"metrics": [{"key": "l", "value": v}] if v is not None else []}}
            for t, v in ((1, 0.3), (2, None), (3, 0.1))]
    ordered = search.sort(runs, search.parse_order(["metrics.l ASC"]))
    assert [r["info"]["start_time"] for r in ordered] == [3, 1, 2]  # a missing value last
