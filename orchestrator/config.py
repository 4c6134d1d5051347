"""Typed run configuration: YAML -> nested dataclasses, with clear errors.

Each component owns a small dataclass; the recipe is plain data. This module imports no ML
framework so configs can be checked anywhere, fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from checkpointing.config import CheckpointConfig
from dataloading.config import DataConfig
from orchestrator.errors import ConfigError
from orchestrator.schema import build, kind, option


class Backend(str, Enum):
    AUTO = "auto"  # nccl when the worker has a GPU, gloo otherwise
    GLOO = "gloo"
    NCCL = "nccl"


@dataclass
class RunConfig:
    name: str | None = option(None, help="run name; defaults to the config file's stem")
    seed: int = option(0, min=0, help="seeds weights, data order and dropout; same seed, same run")
    tags: list[str] = option([], help="free-form labels shown with the run")


@dataclass
class ScalingConfig:
    num_workers: int = option(2, min=1, help="ranks (one Ray actor each)")
    cpus_per_worker: float = option(1.0, min=0, help="CPUs reserved per worker in the placement group")
    gpus_per_worker: float = option(0.0, min=0, help="GPUs per worker; > 0 selects NCCL with backend auto")
    start_timeout_s: float = option(60.0, min=0, help="give up reserving resources after this long")
    torch_threads: int = option(1, min=1, help="torch intra-op threads per worker")
    min_workers: int | None = option(
        None, min=1, help="elastic: after losing workers, go on with as few as this (sizes dividing the global batch)"
    )


@dataclass
class ClusterConfig:
    dashboard: bool = option(True, help="start the Ray dashboard (127.0.0.1) with an embedded cluster")


@dataclass
class DistributedConfig:
    backend: Backend = option(Backend.AUTO, help="auto: nccl when the worker has a GPU, gloo otherwise")
    timeout_s: float = option(300.0, min=1, help="torch.distributed collective timeout")


@dataclass
class ModelConfig:
    factory: str | None = option(None, help='"pkg.module:function" building your own nn.Module')
    kwargs: dict[str, Any] = option({}, help="extra keyword arguments for the factory")
    n_layer: int = option(4, min=1, help="built-in GPT: transformer blocks")
    n_head: int = option(4, min=1, help="built-in GPT: attention heads")
    d_model: int = option(128, min=8, help="built-in GPT: width")
    dropout: float = option(0.0, min=0, max=1, help="built-in GPT: dropout")


@dataclass
class OptimConfig:
    lr: float = option(3e-3, min=0, help="peak AdamW learning rate")
    min_lr_ratio: float = option(0.1, min=0, max=1, help="cosine decays to lr * this")
    warmup_steps: int = option(20, min=0, help="linear warmup to lr")
    weight_decay: float = option(0.1, min=0, help="AdamW decay on weight matrices and embeddings")
    beta1: float = option(0.9, min=0, max=1, help="AdamW beta1")
    beta2: float = option(0.95, min=0, max=1, help="AdamW beta2")
    grad_clip: float = option(1.0, min=0, help="max global grad norm; 0 disables clipping")


@dataclass
class TrainConfig:
    max_steps: int = option(200, min=1, help="optimizer steps in the run")
    eval_every: int = option(50, min=0, help="steps between evals on the held-out split (and at the end); 0 disables")
    eval_batches: int = option(4, min=1, help="global batches per eval (the same ones every time)")
    deterministic: bool = option(True, help="torch.use_deterministic_algorithms")


class StragglerAction(str, Enum):
    REPORT = "report"  # an alert and the per-rank score, nothing else
    RESTART = "restart"  # also restart at the next checkpoint, away from the straggler's node if there is room


@dataclass
class HangConfig:
    timeout_s: float = option(45.0, min=1, help="a stall is declared when no rank completes a step (or an eval batch) for this long ...")
    step_time_factor: float = option(10.0, min=1, help="... or this many recent median step times, whichever is longer")
    first_step_timeout_s: float = option(
        300.0, min=1, help="... but never less than this before a group's first step (start-up, restore, first batch)")
    heartbeat_s: float = option(1.0, min=0.1, help="how often each rank reports step, phase and collective counters")
    enabled: bool = option(True, help="heartbeats, the stall watchdog and Flight Recorder dumps (off only to measure their cost)")
    flight_recorder_entries: int = option(
        2000, min=0, help="torch Flight Recorder ring buffer per rank (last N collectives), dumped into stall reports; 0 = off")
    node_checks: bool = option(True, help="after a stall, check the suspect nodes (GPU/NVML, host pressure, compute, all-reduce probe)")
    node_check_timeout_s: float = option(60.0, min=1, help="bound on the node checks of one stall")
    avoid_culprit_node: bool = option(True, help="restart without the culprit's node when the cluster has room elsewhere")
    straggler_action: StragglerAction = option(
        StragglerAction.REPORT, help="on a straggler: report, or also restart at the next checkpoint (counted in fault_tolerance.max_restarts)")


class OnNonFinite(str, Enum):
    FAIL = "fail"  # stop the run with a clear error
    ROLLBACK = "rollback"  # restore the last checkpoint and skip the offending batch


@dataclass
class FaultToleranceConfig:
    max_restarts: int = option(3, min=0, help="restarts of the worker group before the run fails")
    backoff_s: float = option(1.0, min=0, help="delay before the second restart; doubles per restart (with jitter), capped at 30 s; the first is immediate")
    on_nonfinite: OnNonFinite = option(OnNonFinite.FAIL, help="a NaN/inf training loss: fail, or roll back and skip the batch")


@dataclass
class TelemetryConfig:
    flush_every_s: float = option(1.0, min=0.05, help="how often workers send metrics to the store")
    progress_every_s: float = option(5.0, min=0.1, help="how often the driver prints progress")
    system_every_s: float = option(5.0, min=0, help="per-rank CPU/memory/disk/network/GPU sampling period; 0 disables")
    prometheus_port: int | None = option(
        None, min=0, max=65535, help="Prometheus /metrics endpoint: null = none, 0 = a free port, N = port N"
    )
    prometheus_host: str = option("127.0.0.1", help="interface for the Prometheus endpoint")
    alert_webhook: str | None = option(None, help="URL that receives every alert as a JSON POST (retried with backoff)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    hang: HangConfig = field(default_factory=HangConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --- loading ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults with path=None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {kind(loaded)}")
        raw = loaded
    for item in overrides:
        apply_override(raw, item)
    cfg = build(Config, raw, "", where)
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "run"
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from its stored dict form (e.g. inside a worker)."""
    cfg = build(Config, raw, "", "stored config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve more than one field."""
    if cfg.model.factory is None and cfg.model.d_model % cfg.model.n_head:
        raise ConfigError(
            f"model.d_model={cfg.model.d_model} must be divisible by model.n_head={cfg.model.n_head}"
        )
    if cfg.data.global_batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )
    if cfg.scaling.min_workers is not None and cfg.scaling.min_workers > cfg.scaling.num_workers:
        raise ConfigError(f"scaling.min_workers={cfg.scaling.min_workers} is above scaling.num_workers="
                          f"{cfg.scaling.num_workers}")
    if cfg.scaling.cpus_per_worker <= 0 and cfg.scaling.gpus_per_worker <= 0:
        raise ConfigError("scaling.cpus_per_worker and scaling.gpus_per_worker are both 0; a worker needs one of them")
    if cfg.model.factory is not None and ":" not in cfg.model.factory:
        raise ConfigError(f'model.factory={cfg.model.factory!r}: expected "pkg.module:function"')


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# --- storing ---------------------------------------------------------------------------

SECRET_WORDS = ("secret", "token", "password", "key")
REDACTED = "<redacted>"


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config as dotted keys (an empty mapping stays a value)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def redact(obj: Any) -> Any:
    """Copy of a plain config with the values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
