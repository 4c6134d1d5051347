"""The MLflow REST API subset that MLflow's tracking client uses, answered from our store, so an
unmodified client (`MLFLOW_TRACKING_URI=http://host:port`) logs into it.

Mapping (docs/TRACKING.md, "Logging with MLflow's client"):

- an experiment is the run tag `mlflow.experiment` (its name); a run without it is in
  MLflow's "Default" experiment, id "0" (runs launched by orchestrator included). An
  experiment's id is derived from its name, so it never changes; experiments created before
  they have runs are remembered under the reserved tag owner `#mlflow_experiments`;
- MLflow's run id is our run id; a run's MLflow params are its config (flat keys, string
  values), its tags are our tags, MLflow's own `mlflow.*` tags sit in the run's meta;
- metrics are our points at rank 0, steps and wall times kept (logged_points.py);
- RUNNING/FINISHED/FAILED/KILLED <-> running/completed/failed/stopped.

Every answer is (HTTP status, JSON-able object); errors have MLflow's shape
{"error_code": ..., "message": ...}. An endpoint not implemented here is a 501 naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from common.errors import UserError
from orchestrator.config import flatten
from orchestrator.logged_points import RANK, PointWriter, new_run_id, series_points, wall_times
from orchestrator.ui import mlflow_search as search
from orchestrator.ui.mlflow_wire import (
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    MlflowError,
    Request,
    as_float,
    as_int,
    bad,
    check_name,
    key_value,
    missing,
    ms,
    not_implemented,
    number_json,
)

PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
DEFAULT_EXPERIMENT = ("0", "Default")
EXPERIMENT_TAG = "mlflow.experiment"
REGISTRY = "#mlflow_experiments"  # tag owner of experiments created before their first run
STATUS_TO_MLFLOW = {"running": "RUNNING", "completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED",
                    "interrupted": "KILLED", "lost": "FAILED"}
STATUS_FROM_MLFLOW = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "completed", "FAILED": "failed",
                      "KILLED": "stopped"}
STATUS_NUMBERS = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}
VIEW_TYPES = {1: "ACTIVE_ONLY", 2: "DELETED_ONLY", 3: "ALL"}
MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MAX_BATCH_TAGS, MAX_BATCH_TOTAL = 1000, 100, 100, 1000
MAX_SEARCH_RESULTS, DEFAULT_SEARCH_RESULTS = 50000, 1000
log = logging.getLogger(__name__)


def experiment_id_of(name: str) -> str:
    """A stable id for an experiment name (MLflow's ids are decimal strings)."""
    if name == DEFAULT_EXPERIMENT[1]:
        return DEFAULT_EXPERIMENT[0]
    return str(int(hashlib.sha256(name.encode()).hexdigest()[:13], 16))


class MlflowApi:
    def __init__(self, store):
        self.store = store
        self.writer = PointWriter(store)
        self._lock = threading.RLock()  # one store connection: one call at a time
        self.routes: dict[tuple[str, str], Callable[[Request], dict]] = {
            ("POST", "experiments/create"): self.create_experiment,
            ("GET", "experiments/get"): self.get_experiment,
            ("GET", "experiments/get-by-name"): self.get_experiment_by_name,
            ("POST", "experiments/search"): self.search_experiments,
            ("GET", "experiments/search"): self.search_experiments,
            ("POST", "experiments/set-experiment-tag"): self.set_experiment_tag,
            ("POST", "runs/create"): self.create_run,
            ("POST", "runs/update"): self.update_run,
            ("GET", "runs/get"): self.get_run,
            ("POST", "runs/search"): self.search_runs,
            ("POST", "runs/log-metric"): self.log_metric,
            ("POST", "runs/log-parameter"): self.log_param,
            ("POST", "runs/set-tag"): self.set_tag,
            ("POST", "runs/log-batch"): self.log_batch,
            ("POST", "runs/log-inputs"): self.log_inputs,
            ("GET", "metrics/get-history"): self.get_history,
            ("GET", "metrics/get-history-bulk-interval"): self.get_history_bulk_interval,
        }

    # --- the entry point ----------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, object]:
        endpoint = path
        for prefix in PREFIXES:
            if path.startswith(prefix):
                endpoint = path[len(prefix):]
                break
        endpoint = endpoint.strip("/")
        try:
            route = self.routes.get((method, endpoint))
            if route is None:
                if any(e == endpoint for _, e in self.routes):
                    allowed = sorted(m for m, e in self.routes if e == endpoint)
                    return 405, {"error_code": "BAD_REQUEST",
                                 "message": f"{method} {path} is not allowed; use {' or '.join(allowed)}"}
                raise not_implemented(f"the MLflow endpoint {method} {path[:200]} is not implemented by this server "
                                      "(it answers MLflow's tracking calls: experiments, runs, metrics, params, tags)")
            with self._lock:
                return 200, route(Request(method, query, body))
        except MlflowError as e:
            return e.status, {"error_code": e.code, "message": e.message}
        except UserError as e:  # the store: full, unreadable
            return 500, {"error_code": "INTERNAL_ERROR", "message": str(e)}
        except Exception:  # a bug of ours (or a locked store): logged here, never a dropped connection
            log.exception("mlflow api: %s %s failed", method, path[:200])
            return 500, {"error_code": "INTERNAL_ERROR", "message": f"internal error answering {method} "
                                                                    f"{path[:200]} (the server's log has the details)"}

    # --- experiments --------------------------------------------------------------------

    def _registry(self) -> dict[str, dict]:
        out = {}
        for eid, text in self.store.tags(REGISTRY).items():
            try:
                out[eid] = json.loads(text)
            except ValueError:
                continue
        return out

    def _experiments(self) -> dict[str, dict]:
        """Every experiment: Default, the created ones, and the names runs are tagged with."""
        found: dict[str, dict] = {DEFAULT_EXPERIMENT[0]: {"name": DEFAULT_EXPERIMENT[1], "creation_time": None}}
        found.update(self._registry())
        for run in self.store.runs():
            name = run["tags"].get(EXPERIMENT_TAG)
            created = ms(run["created_at"])
            if name:
                entry = found.setdefault(experiment_id_of(name), {"name": name, "creation_time": created})
                if entry.get("creation_time") is None or (created or 0) < entry["creation_time"]:
                    entry["creation_time"] = created
        return found

    @staticmethod
    def _experiment_json(eid: str, e: dict) -> dict:
        created = e.get("creation_time") or 0
        return {"experiment_id": eid, "name": e["name"], "artifact_location": e.get("artifact_location") or "",
                "lifecycle_stage": "active", "creation_time": created, "last_update_time": created,
                "tags": [{"key": k, "value": v} for k, v in sorted((e.get("tags") or {}).items())]}

    def _experiment(self, eid: str) -> dict:
        e = self._experiments().get(eid)
        if e is None:
            raise missing(f"No Experiment with id={eid} exists")
        return e

    def create_experiment(self, req: Request) -> dict:
        name = req.str("name", required=True)
        experiments = self._experiments()
        eid = experiment_id_of(name)
        if eid in experiments:
            raise MlflowError(400, "RESOURCE_ALREADY_EXISTS", f"Experiment '{name}' already exists.")
        tags = dict(key_value(t, "experiment tag", MAX_TAG_VALUE) for t in req.list("tags"))
        entry = {"name": name, "creation_time": ms(time.time()), "artifact_location": req.str("artifact_location"),
                 "tags": tags}
        self.store.tag(REGISTRY, eid, json.dumps(entry))
        return {"experiment_id": eid}

    def get_experiment(self, req: Request) -> dict:
        eid = req.str("experiment_id", required=True)
        return {"experiment": self._experiment_json(eid, self._experiment(eid))}

    def get_experiment_by_name(self, req: Request) -> dict:
        name = req.str("experiment_name", required=True)
        eid = experiment_id_of(name)
        e = self._experiments().get(eid)
        if e is None or e["name"] != name:
            raise missing(f"Could not find experiment with name '{name}'")
        return {"experiment": self._experiment_json(eid, e)}

    def set_experiment_tag(self, req: Request) -> dict:
        eid = req.str("experiment_id", required=True)
        key, value = key_value(req.args, "experiment tag", MAX_TAG_VALUE)
        entry = {**self._experiment(eid)}
        entry["tags"] = {**(entry.get("tags") or {}), key: value}
        self.store.tag(REGISTRY, eid, json.dumps(entry))
        return {}

    def search_experiments(self, req: Request) -> dict:
        max_results = self._max_results(req)
        try:
            conds = search.parse_filter(req.str("filter"), experiments=True)
            order = search.parse_order(req.list("order_by"), experiments=True)
        except search.NotSupported as e:
            raise not_implemented(f"experiments/search: {e} is not supported by this server") from None
        except search.BadFilter as e:
            raise bad(f"experiments/search: {e}") from None
        if self._view_type(req.args.get("view_type")) == "DELETED_ONLY":
            return {"experiments": []}  # nothing is ever deleted here
        found = [self._experiment_json(eid, e) for eid, e in self._experiments().items()]
        found = [e for e in found if search.matches(e, conds)]
        found = search.sort(found, order or [("attributes", "last_update_time", True)])
        try:
            items, token = search.page(found, max_results, req.str("page_token"))
        except search.BadFilter as e:
            raise bad(str(e)) from None
        return {"experiments": items, **({"next_page_token": token} if token else {})}

    @staticmethod
    def _view_type(v) -> str:
        if v in (None, ""):
            return "ACTIVE_ONLY"
        name = VIEW_TYPES.get(v) if isinstance(v, int) else VIEW_TYPES.get(int(v)) if str(v).isdigit() else str(v)
        if name not in VIEW_TYPES.values():
            raise bad(f"view type {v!r}: expected one of {', '.join(VIEW_TYPES.values())}")
        return name

    @staticmethod
    def _max_results(req: Request) -> int:
        n = req.int("max_results", default=DEFAULT_SEARCH_RESULTS)
        if n is None or n < 1 or n > MAX_SEARCH_RESULTS:
            raise bad(f"max_results must be between 1 and {MAX_SEARCH_RESULTS}, got {n}")
        return n

    # --- runs ---------------------------------------------------------------------------

    def _run(self, req: Request) -> dict:
        run_id = req.str("run_id", required=True, alias="run_uuid")
        if not self.store.has_run(run_id):
            raise missing(f"Run with id={run_id} not found")
        return self.store.run(run_id)

    @staticmethod
    def _from_mlflow(run: dict) -> bool:
        return run["meta"].get("source") == "mlflow"

    def _writable(self, run: dict, what: str) -> None:
        if not self._from_mlflow(run):
            raise bad(f"run {run['id']} was not created through MLflow's API (it was launched or imported);"
                      f" its {what} cannot be changed from an MLflow client")

    def create_run(self, req: Request) -> dict:
        eid = req.str("experiment_id") or DEFAULT_EXPERIMENT[0]
        experiment = self._experiment(eid)
        tags = dict(key_value(t, "tag", MAX_TAG_VALUE) for t in req.list("tags"))
        name = req.str("run_name") or tags.get("mlflow.runName") or "mlflow-run"
        start = as_int(req.args.get("start_time"), "start_time", default=ms(time.time()))
        own = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
        system = {k: v for k, v in tags.items() if k.startswith("mlflow.") and k != "mlflow.runName"}
        if eid != DEFAULT_EXPERIMENT[0]:
            own[EXPERIMENT_TAG] = experiment["name"]
        meta = {"source": "mlflow", "mlflow": {"user_id": req.str("user_id") or tags.get("mlflow.user"),
                                               "start_time": start, "tags": system, "inputs": []}}
        for _ in range(5):  # an id taken by a run created in the same second: draw another
            run_id = new_run_id(name)
            if not self.store.has_run(run_id):
                break
        self.store.create_run(run_id=run_id, name=name, config={}, git_commit=tags.get("mlflow.source.git.commit"),
                              host="(MLflow client)", command=tags.get("mlflow.source.name") or "MLflow client",
                              world_size=1, meta=meta, tags=own)
        return {"run": self._run_json(self.store.run(run_id))}

    def update_run(self, req: Request) -> dict:
        run = self._run(req)
        self._writable(run, "status")
        status = req.args.get("status")
        if status is not None:
            status = STATUS_NUMBERS.get(status, status) if isinstance(status, int) else str(status)
            ours = STATUS_FROM_MLFLOW.get(status)
            if ours is None:
                raise bad(f"status {status!r}: expected one of {', '.join(STATUS_FROM_MLFLOW)}")
            if ours == "running" and run["status"] != "running":
                self.store.reopen_run(run["id"], config=run["config"])
            elif ours != "running":
                self.store.finish_run(run["id"], ours, summary=run["summary"])
        end = req.args.get("end_time")
        if end is not None:
            self._set_mlflow_meta(run, end_time=as_int(end, "end_time"))
        name = req.str("run_name")
        if name and name != run["name"]:
            self.store.update_run(run["id"], name=name)
        return {"run_info": self._run_json(self.store.run(run["id"]))["info"]}

    def _set_mlflow_meta(self, run: dict, **fields) -> None:
        mlflow = {**run["meta"].get("mlflow", {}), **fields}
        self.store.update_meta(run["id"], mlflow=mlflow)
        run["meta"]["mlflow"] = mlflow

    def get_run(self, req: Request) -> dict:
        return {"run": self._run_json(self._run(req))}

    def search_runs(self, req: Request) -> dict:
        max_results = self._max_results(req)
        ids = [str(e) for e in req.list("experiment_ids")]
        try:
            conds = search.parse_filter(req.str("filter"))
            order = search.parse_order(req.list("order_by"))
        except search.NotSupported as e:
            raise not_implemented(f"runs/search: {e} is not supported by this server") from None
        except search.BadFilter as e:
            raise bad(f"runs/search: {e}") from None
        if self._view_type(req.args.get("run_view_type")) == "DELETED_ONLY":
            return {"runs": []}
        wanted = set(ids)
        runs = [r for r in self.store.runs() if not wanted or self._experiment_of(r)[0] in wanted]
        found = [j for j in (self._run_json(r) for r in runs) if search.matches(j, conds)]
        found = search.sort(found, [*order, ("attributes", "start_time", True), ("attributes", "run_id", False)])
        try:
            items, token = search.page(found, max_results, req.str("page_token"))
        except search.BadFilter as e:
            raise bad(str(e)) from None
        return {"runs": items, **({"next_page_token": token} if token else {})}

    def _experiment_of(self, run: dict) -> tuple[str, str]:
        name = run["tags"].get(EXPERIMENT_TAG)
        return (experiment_id_of(name), name) if name else DEFAULT_EXPERIMENT

    def _run_json(self, run: dict) -> dict:
        mlflow = run["meta"].get("mlflow", {})
        start = mlflow.get("start_time") or ms(run["created_at"])
        info = {"run_id": run["id"], "run_uuid": run["id"], "run_name": run["name"],
                "experiment_id": self._experiment_of(run)[0], "user_id": mlflow.get("user_id") or "",
                "status": STATUS_TO_MLFLOW.get(run["status"], "RUNNING"), "start_time": start,
                "artifact_uri": "", "lifecycle_stage": "active"}
        end = mlflow.get("end_time") or ms(run["ended_at"])
        if run["status"] != "running" and end is not None:
            info["end_time"] = end
        params = [{"key": k, "value": v if isinstance(v, str) else json.dumps(v)}
                  for k, v in sorted(flatten(run["config"]).items())]
        tags = {**mlflow.get("tags", {}), **run["tags"], "mlflow.runName": run["name"]}
        data = {"metrics": self._latest_metrics(run["id"]), "params": params,
                "tags": [{"key": k, "value": v} for k, v in sorted(tags.items())]}
        inputs = {"dataset_inputs": mlflow.get("inputs", [])}
        return {"info": info, "data": data, "inputs": inputs}

    def _latest_metrics(self, run_id: str) -> list[dict]:
        """Each key's value at its highest step (the latest value logged there), as MLflow reports it."""
        out = []
        for key in self.store.metric_keys(run_id):
            found = self.store.points.find(run_id, key)
            ranks = sorted({r for _, r, _, _ in found})
            if not ranks:  # inherited from a forked-from run only
                rows = self.store.buckets(run_id, key, 1)
                if rows:
                    out.append({"key": key, "value": number_json(rows[-1]["last"]), "timestamp": 0,
                                "step": rows[-1]["last_step"]})
                continue
            rank = RANK if RANK in ranks else ranks[0]
            best = None
            for sid, r, attempt, _ in found:
                span = self.store.points.span(sid) if r == rank else None
                if span is not None and (best is None or (span[1], attempt) > best[:2]):
                    best = (span[1], attempt, sid)
            if best is None:
                continue
            step, attempt, sid = best
            value = float(self.store.points.read(sid, lo=step, hi=step).values[-1])
            wall = wall_times(self.store, run_id, key, rank, attempt, np.array([step]))[0]
            out.append({"key": key, "value": number_json(value), "timestamp": ms(wall) or 0, "step": int(step)})
        return out

    # --- logging ------------------------------------------------------------------------

    def _metric_rows(self, items: list, default_time: int | None = None) -> list[tuple[str, int, float, float]]:
        rows = []
        for m in items:
            if not isinstance(m, dict):
                raise bad(f"each metric must be an object with key, value, timestamp, step; got {m!r}")
            key = check_name("metric", m.get("key"))
            if "value" not in m:
                raise bad(f"metric '{key}' has no value")
            value = as_float(m["value"], f"metric '{key}' value")
            stamp = as_int(m.get("timestamp"), f"metric '{key}' timestamp", default=default_time or ms(time.time()))
            step = as_int(m.get("step"), f"metric '{key}' step")
            if not -(2**63) <= step < 2**63:
                raise bad(f"metric '{key}' step {step} is out of the int64 range")
            rows.append((key, step, value, stamp / 1000.0))
        return rows

    def log_metric(self, req: Request) -> dict:
        run = self._run(req)
        self._writable(run, "metrics")
        self.writer.write(run["id"], self._metric_rows([req.args]))
        return {}

    def log_param(self, req: Request) -> dict:
        run = self._run(req)
        self._writable(run, "params")
        self._set_params(run, [key_value(req.args, "param", MAX_PARAM_VALUE)])
        return {}

    def _set_params(self, run: dict, params: list[tuple[str, str]]) -> None:
        if not params:
            return
        config = dict(run["config"])
        for key, value in params:
            old = config.get(key)
            if old is not None and old != value:
                raise bad(f"Changing param values is not allowed. Param with key='{key}' was already logged with "
                          f"value='{old}' for run ID='{run['id']}'. Attempted logging new value '{value}'.")
            config[key] = value
        if config != run["config"]:
            self.store.update_run(run["id"], config=config)
            run["config"] = config

    def set_tag(self, req: Request) -> dict:
        run = self._run(req)
        self._set_tags(run, [key_value(req.args, "tag", MAX_TAG_VALUE)])
        return {}

    def _set_tags(self, run: dict, tags: list[tuple[str, str]]) -> None:
        system = {}
        for key, value in tags:
            if key == "mlflow.runName":
                if self._from_mlflow(run) and value != run["name"]:
                    self.store.update_run(run["id"], name=value)
            elif key == EXPERIMENT_TAG:
                raise bad(f"tag {EXPERIMENT_TAG} is the run's experiment; it is set when the run is created")
            elif key.startswith("mlflow."):
                system[key] = value
            else:
                self.store.tag(run["id"], key, value)
        if system:
            mlflow = run["meta"].get("mlflow", {})
            self._set_mlflow_meta(run, tags={**mlflow.get("tags", {}), **system})

    def log_batch(self, req: Request) -> dict:
        run = self._run(req)
        metrics, params, tags = req.list("metrics"), req.list("params"), req.list("tags")
        for what, items, limit in (("metrics", metrics, MAX_BATCH_METRICS), ("params", params, MAX_BATCH_PARAMS),
                                   ("tags", tags, MAX_BATCH_TAGS)):
            if len(items) > limit:
                raise bad(f"A batch logging request can contain at most {limit} {what}. Got {len(items)} {what}.")
        if len(metrics) + len(params) + len(tags) > MAX_BATCH_TOTAL:
            raise bad(f"A batch logging request can contain at most {MAX_BATCH_TOTAL} metrics, params and tags in"
                      f" all. Got {len(metrics) + len(params) + len(tags)}.")
        if metrics or params:
            self._writable(run, "metrics and params")
        rows = self._metric_rows(metrics)  # everything checked before anything is stored
        kv_params = [key_value(p, "param", MAX_PARAM_VALUE) for p in params]
        kv_tags = [key_value(t, "tag", MAX_TAG_VALUE) for t in tags]
        if any(k == EXPERIMENT_TAG for k, _ in kv_tags):
            raise bad(f"tag {EXPERIMENT_TAG} is the run's experiment; it is set when the run is created")
        self._set_params(run, kv_params)  # checks every param before it changes anything
        self._set_tags(run, kv_tags)
        if rows:
            self.writer.write(run["id"], rows)
        return {}

    def log_inputs(self, req: Request) -> dict:
        run = self._run(req)
        self._writable(run, "inputs")
        datasets = req.list("datasets")
        if any(not isinstance(d, dict) for d in datasets):
            raise bad("each dataset input must be an object")
        if datasets:
            mlflow = run["meta"].get("mlflow", {})
            self._set_mlflow_meta(run, inputs=[*mlflow.get("inputs", []), *datasets])
        if req.list("models"):
            raise not_implemented("runs/log-inputs with models (MLflow's logged models) is not supported by this server")
        return {}

    # --- metric history -----------------------------------------------------------------

    def _history(self, run: dict, key: str) -> list[dict]:
        """Every value of a key: for MLflow runs each logged value (repeats at a step included),
        for launched runs rank 0's value per step (or the lowest rank's)."""
        if self._from_mlflow(run) or run["meta"].get("source") == "tensorboard":
            rows = []
            for rank, attempt, p in series_points(self.store, run["id"], key):
                if rank != RANK:
                    continue
                walls = wall_times(self.store, run["id"], key, rank, attempt, p.steps)
                rows += [(int(s), attempt, float(v), ms(w) or 0) for s, v, w in zip(p.steps, p.values, walls,
                                                                                     strict=True)]
            rows.sort()
            return [{"key": key, "value": number_json(v), "timestamp": t, "step": s} for s, _, v, t in rows]
        ranks = self.store.ranks(run["id"], key)
        if not ranks:
            return []
        p = self.store.rank_points(run["id"], key, RANK if RANK in ranks else ranks[0])
        return [{"key": key, "value": number_json(float(v)), "timestamp": 0, "step": int(s)}
                for s, v in zip(p.steps, p.values, strict=True)]

    def get_history(self, req: Request) -> dict:
        run = self._run(req)
        key = req.str("metric_key", required=True)
        history = self._history(run, key)
        n = req.int("max_results")
        if n is None:
            return {"metrics": history}
        if n < 1:
            raise bad(f"max_results must be at least 1, got {n}")
        try:
            items, token = search.page(history, n, req.str("page_token"))
        except search.BadFilter as e:
            raise bad(str(e)) from None
        return {"metrics": items, **({"next_page_token": token} if token else {})}

    def get_history_bulk_interval(self, req: Request) -> dict:
        """Up to max_results points per run between start_step and end_step; when there are more,
        each of max_results/2 step ranges keeps its lowest and its highest value, so spikes show."""
        ids = req.list("run_ids") or ([req.str("run_ids")] if req.str("run_ids") else [])
        key = req.str("metric_key", required=True)
        if not ids:
            raise bad("missing value for required parameter 'run_ids'")
        if len(ids) > 100:
            raise bad(f"at most 100 run_ids, got {len(ids)}")
        n = req.int("max_results", default=320)
        if n is None or n < 2 or n > 2500:
            raise bad(f"max_results must be between 2 and 2500, got {n}")
        lo, hi = req.int("start_step"), req.int("end_step")
        if (lo is None) != (hi is None) or (lo is not None and lo > hi):
            raise bad("give both start_step and end_step, start_step <= end_step (or neither)")
        out = []
        for run_id in ids:
            if not self.store.has_run(run_id):
                raise missing(f"Run with id={run_id} not found")
            history = [h for h in self._history(self.store.run(run_id), key)
                       if lo is None or lo <= h["step"] <= hi]
            out += [{**h, "run_id": run_id} for h in _keep_extremes(history, n)]
        return {"metrics": out}


def _keep_extremes(history: list[dict], n: int) -> list[dict]:
    if len(history) <= n:
        return history
    values = np.array([float(h["value"]) for h in history])
    edges = np.linspace(0, len(history), n // 2 + 1).astype(int)
    keep = set()
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b > a:
            chunk = values[a:b]
            keep.add(a + int(np.nanargmin(chunk)) if not np.all(np.isnan(chunk)) else a)
            keep.add(a + int(np.nanargmax(chunk)) if not np.all(np.isnan(chunk)) else b - 1)
    return [history[i] for i in sorted(keep)]
