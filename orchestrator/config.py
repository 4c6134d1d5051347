"""Typed run configuration: YAML -> nested dataclasses, with clear errors.

Each component owns a small dataclass; the recipe is plain data. This module imports no ML
framework so configs can be checked anywhere, fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from checkpointing.config import CheckpointConfig
from common.errors import ConfigError
from common.schema import MAX_SECONDS, MAX_STEPS, MAX_WORKERS, build, kind, option
from dataloading.config import DataConfig


class Backend(str, Enum):
    AUTO = "auto"  # nccl when the worker has a GPU, gloo otherwise
    GLOO = "gloo"
    NCCL = "nccl"


class ScriptStart(str, Enum):
    WARM = "warm"  # forked from a process beside the worker that already imported torch (orchestrator/zygote.py)
    EXEC = "exec"  # a fresh `python SCRIPT ARGS`


class ResumeMode(str, Enum):
    NEVER = "never"  # every launch is a new run
    AUTO = "auto"  # a launch with the name of an unfinished run continues it (a re-submitted job)


@dataclass
class RunConfig:
    name: str | None = option(None, help="run name; defaults to the config file's stem")
    seed: int = option(0, min=0, max=2**32 - 1, help="seeds weights, data order and dropout; same seed, same run")
    tags: list[str] = option([], help="free-form labels shown with the run")
    resume: ResumeMode = option(ResumeMode.NEVER, help="auto: launching the name of a lost, failed, interrupted or "
                                "stopped run continues it from its latest good checkpoint (a re-submitted job)")


@dataclass
class ScalingConfig:
    num_workers: int = option(2, min=1, max=MAX_WORKERS, help="ranks (one Ray actor each)")
    cpus_per_worker: float = option(1.0, min=0, max=1024, help="CPUs reserved per worker in the placement group")
    gpus_per_worker: float = option(0.0, min=0, max=64, help="GPUs per worker; > 0 selects NCCL with backend auto")
    start_timeout_s: float = option(60.0, min=0, max=MAX_SECONDS, help="give up reserving resources after this long")
    torch_threads: int = option(1, min=1, max=1024, help="torch intra-op threads per worker")
    min_workers: int | None = option(
        None, min=1, max=MAX_WORKERS, help="elastic: after losing workers, go on with as few as this (sizes dividing the global batch)"
    )


@dataclass
class ClusterConfig:
    dashboard: bool = option(True, help="start the Ray dashboard (127.0.0.1) with an embedded cluster")


@dataclass
class DistributedConfig:
    backend: Backend = option(Backend.AUTO, help="auto: nccl when the worker has a GPU, gloo otherwise")
    timeout_s: float = option(600.0, min=1, max=MAX_SECONDS, help="torch.distributed collective timeout; must exceed "
                              "the stall watchdog's limits + 60 s, so torch never aborts a hang before it is diagnosed")
    async_collectives: bool = option(False, help="test mode (ddp, built-in loop): gradients all-reduced with "
                                     "async_op=True after backward and waited for at the optimizer step, so gloo on CPU "
                                     "behaves like DDP on CUDA as the host sees it (the hang watchdog's attribution "
                                     "is tested against it)")


class Strategy(str, Enum):
    DDP = "ddp"  # every rank holds the whole model; gradients all-reduced
    FSDP = "fsdp"  # FSDP2 fully_shard: parameters, gradients and optimizer state sharded across ranks


@dataclass
class ParallelismConfig:
    strategy: Strategy = option(
        Strategy.DDP, help="ddp: replicated model, gradients all-reduced; fsdp: FSDP2 fully_shard per transformer "
                           "block, sharded (DCP) checkpoints that resume on any world size")


@dataclass
class ModelConfig:
    factory: str | None = option(None, help='"pkg.module:function" building your own nn.Module')
    kwargs: dict[str, Any] = option({}, help="extra keyword arguments for the factory")
    n_layer: int = option(4, min=1, max=10_000, help="built-in GPT: transformer blocks")
    n_head: int = option(4, min=1, max=10_000, help="built-in GPT: attention heads")
    d_model: int = option(128, min=8, max=1_000_000, help="built-in GPT: width")
    dropout: float = option(0.0, min=0, max=1, help="built-in GPT: dropout")


@dataclass
class OptimConfig:
    lr: float = option(3e-3, min=0, help="peak AdamW learning rate")
    min_lr_ratio: float = option(0.1, min=0, max=1, help="cosine decays to lr * this")
    warmup_steps: int = option(20, min=0, max=MAX_STEPS, help="linear warmup to lr")
    weight_decay: float = option(0.1, min=0, help="AdamW decay on weight matrices and embeddings")
    beta1: float = option(0.9, min=0, max=1, help="AdamW beta1")
    beta2: float = option(0.95, min=0, max=1, help="AdamW beta2")
    grad_clip: float = option(1.0, min=0, help="max global grad norm; 0 disables clipping")


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class TrainConfig:
    max_steps: int = option(200, min=1, max=MAX_STEPS, help="optimizer steps in the run")
    eval_every: int = option(50, min=0, max=MAX_STEPS, help="steps between evals on the held-out split (and at the end); 0 disables")
    eval_batches: int = option(4, min=1, max=1_000_000, help="global batches per eval (the same ones every time)")
    deterministic: bool = option(True, help="torch.use_deterministic_algorithms")
    precision: Precision = option(Precision.FP32, help="fp32, or bf16: autocast around forward and loss (CPU too); "
                                                       "weights, gradients and optimizer state stay fp32")
    grad_accum_steps: int = option(1, min=1, max=1_000_000, help="micro-batches per optimizer step, gradients reduced "
                                                                "on the last only; must divide the per-rank batch")
    compile: bool = option(False, help="torch.compile the model (its first steps are slow while it compiles)")


class StragglerAction(str, Enum):
    REPORT = "report"  # an alert and the per-rank score, nothing else
    RESTART = "restart"  # also restart at the next checkpoint, away from the straggler's node if there is room


@dataclass
class HangConfig:
    timeout_s: float = option(45.0, min=1, max=MAX_SECONDS, help="a stall is declared when no rank completes a step (or an eval batch) for this long ...")
    step_time_factor: float = option(10.0, min=1, max=1e6, help="... or this many recent median step times, whichever is longer")
    first_step_timeout_s: float = option(
        300.0, min=1, max=MAX_SECONDS, help="... but never less than this before a group's first step (start-up, restore, first batch)")
    heartbeat_s: float = option(1.0, min=0.1, max=3600, help="how often each rank reports step, phase and collective counters")
    evidence_factor: float = option(
        5.0, min=0, max=1e6, help="a rank missing a collective the others wait in is named once they have waited this "
        "many median step times (and a rank whose heartbeats stopped after 3 heartbeats), before hang.timeout_s; 0 = off")
    enabled: bool = option(True, help="heartbeats, the stall watchdog and Flight Recorder dumps (off only to measure their cost)")
    flight_recorder_entries: int = option(
        2000, min=0, max=1_000_000, help="torch Flight Recorder ring buffer per rank (last N collectives), dumped into stall reports; 0 = off")
    node_checks: bool = option(True, help="after a stall, check the suspect nodes (GPU/NVML, host pressure, compute, all-reduce probe)")
    node_check_timeout_s: float = option(60.0, min=1, max=MAX_SECONDS, help="bound on the node checks of one stall")
    avoid_culprit_node: bool = option(True, help="restart without the culprit's node when the cluster has room elsewhere, until its node checks pass (once per node)")
    straggler_action: StragglerAction = option(
        StragglerAction.REPORT, help="on a straggler: report, or also restart at the next checkpoint (counted in fault_tolerance.max_restarts)")


class OnNonFinite(str, Enum):
    FAIL = "fail"  # stop the run with a clear error
    ROLLBACK = "rollback"  # restore the last checkpoint and skip the offending batch


@dataclass
class HealthConfig:
    sdc_check_every: int = option(100, min=0, max=MAX_STEPS, help="steps between checks that data-parallel replicas "
                                  "hold bit-identical weights and optimizer state (silent data corruption); 0 = off")


@dataclass
class FaultToleranceConfig:
    max_restarts: int = option(3, min=0, max=1_000_000, help="restarts of the worker group before the run fails")
    backoff_s: float = option(1.0, min=0, max=MAX_SECONDS, help="delay before a restart of a group that failed again before recovering; doubles each time (with jitter), capped at 30 s; the first restart after a recovery is immediate")
    standby_workers: bool = option(False, help="keep warm spare workers (torch imported) beside the group: one per rank "
                                   "on its node and some on nodes with room, so a restart need not start processes and "
                                   "import torch (~2 s a rank); each holds ~0.4 GB of host memory and no CPU once warm; "
                                   "CPU ranks only (Ray hides GPUs from a spare)")
    on_nonfinite: OnNonFinite = option(OnNonFinite.FAIL, help="a NaN/inf training loss: fail, or roll back and skip the batch")
    stop_timeout_s: float = option(120.0, min=1, max=MAX_SECONDS, help="`orchestrator stop`: how long the ranks get to reach "
                                   "a step boundary, save a final checkpoint and end (a script: after its SIGTERM) "
                                   "before they are killed")


class RelayMode(str, Enum):
    AUTO = "auto"  # relays on nodes with several ranks, in groups of 256+ ranks (actors/node_relay.py)
    ON = "on"  # a relay on every node of the group
    OFF = "off"  # every rank calls the run's actors itself


@dataclass
class TelemetryConfig:
    flush_every_s: float = option(1.0, min=0.05, max=3600, help="how often workers send metrics to the store")
    progress_every_s: float = option(5.0, min=0.1, max=MAX_SECONDS, help="how often the driver prints progress")
    system_every_s: float = option(5.0, min=0, max=MAX_SECONDS, help="per-rank CPU/memory/disk/network/GPU sampling period; 0 disables")
    prometheus_port: int | None = option(
        None, min=0, max=65535, help="Prometheus /metrics endpoint: null = none, 0 = a free port, N = port N"
    )
    prometheus_host: str = option("127.0.0.1", help="interface for the Prometheus endpoint")
    alert_webhook: str | None = option(None, help="http(s) URL that receives every alert as a JSON POST (retried with backoff; "
                                                 "a secret: stored redacted, give it again on resume)")
    relay: RelayMode = option(RelayMode.AUTO, help="per-node relays that forward a node's heartbeats and metrics "
                              "together, at most twice a tick, not one call per rank (ranks fall back to direct calls "
                              "if one fails): auto = on nodes with several ranks in groups of 256+ ranks, on = every "
                              "node, off = none")


@dataclass
class TrackingConfig:
    uri: str | None = option(None, help="the tracking store this run writes to: null = $ORCHESTRATOR_STORE, else the "
                                        "SQLite store in $ORCHESTRATOR_HOME; a SQLite path, postgresql://user@host:port/db "
                                        "(password in ~/.pgpass or PGPASSWORD, not here) or http(s)://host:port "
                                        "(an `orchestrator server`)")


@dataclass
class EntrypointConfig:
    """What each rank runs. Neither set: the built-in GPT loop (data.*, model.*, optim.*)."""

    script: str | None = option(None, help="a torchrun-style script run per rank, unchanged (relative to the config file)")
    args: list[str] = option([], help="the script's command-line arguments")
    function: str | None = option(None, help='"module:function" called per rank as fn(ctx, **kwargs) (see docs/ENTRYPOINTS.md)')
    kwargs: dict[str, Any] = option({}, help="keyword arguments for the function")
    workdir: str | None = option(None, help="working directory of the ranks (default: where `launch` ran)")
    start: ScriptStart = option(ScriptStart.WARM, help="how a script's process starts: warm (forked from a process that "
                                "imported torch already; exec when that is unavailable) or exec (a fresh `python SCRIPT`)")

    @property
    def kind(self) -> str:
        return "script" if self.script else "function" if self.function else "builtin"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    hang: HangConfig = field(default_factory=HangConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    entrypoint: EntrypointConfig = field(default_factory=EntrypointConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --- loading ---------------------------------------------------------------------------


MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_NODES = 1_000_000  # counted with aliases expanded: what redacting and storing will walk
MAX_YAML_DEPTH = 100


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults with path=None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        loaded = parse_yaml(_read_config(Path(path)), where)
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
    base = Path(path).absolute().parent if path is not None else Path.cwd()
    if cfg.entrypoint.script:  # relative to the config file, so a recipe runs from anywhere
        cfg.entrypoint.script = str((base / cfg.entrypoint.script).resolve())
    if cfg.entrypoint.workdir is None:
        cfg.entrypoint.workdir = os.getcwd()
    validate(cfg)
    return cfg


def _read_config(p: Path) -> str:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file is larger than {MAX_CONFIG_BYTES // 1024} KiB; a recipe is small "
                          "(put data in data.uri, not in the config)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config file is not UTF-8 text (byte {e.start})") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES (a "billion
    laughs" is a few hundred bytes) or that nest deeper than MAX_YAML_DEPTH, before building them."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node)
        return node


def _expanded_size(root: yaml.Node) -> int:
    sizes: dict[int, int | None] = {}  # by node identity: an alias is the same node object again

    def walk(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _yaml_problem(node, f"nested more than {MAX_YAML_DEPTH} levels deep")
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise _yaml_problem(node, "an alias refers to a node that contains it (a cycle)")
            return sizes[key]
        sizes[key] = None
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += walk(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise _yaml_problem(node, f"expands to more than {MAX_YAML_NODES:,} values (aliases counted "
                                          "each time they are used)")
        sizes[key] = total
        return total

    return walk(root, 0)


class _Unbounded(yaml.MarkedYAMLError):
    """Valid YAML past the size or depth bounds."""


def _yaml_problem(node: yaml.Node, problem: str) -> _Unbounded:
    return _Unbounded(problem=problem, problem_mark=node.start_mark)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data, bounded in expanded size and depth; one-line ConfigError otherwise."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from its stored dict form (e.g. inside a worker)."""
    cfg = build(Config, raw, "", "stored config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve more than one field."""
    if cfg.tracking.uri:
        from common.errors import StoreError
        from orchestrator.store_sql import parse_location

        try:
            parse_location(cfg.tracking.uri, default_root=Path.cwd())
        except StoreError as e:
            raise ConfigError(f"tracking.uri: {e}") from None
    if cfg.telemetry.alert_webhook is not None:
        problem = webhook_problem(cfg.telemetry.alert_webhook)
        if problem:
            raise ConfigError(f"telemetry.alert_webhook={scrub_text(cfg.telemetry.alert_webhook)!r}: {problem}")
    _validate_timeouts(cfg)
    _validate_snapshots(cfg)
    e = cfg.entrypoint
    if e.script and e.function:
        raise ConfigError(f"entrypoint: both script={e.script!r} and function={e.function!r} are set; "
                          "choose one (a script run per rank, or a function called per rank)")
    if e.function is not None and (":" not in e.function or not all(e.function.split(":", 1))):
        raise ConfigError(f'entrypoint.function={e.function!r}: expected "pkg.module:function"')
    if e.args and not e.script:
        raise ConfigError("entrypoint.args: given without entrypoint.script (arguments are for a script)")
    if e.kwargs and not e.function:
        raise ConfigError("entrypoint.kwargs: given without entrypoint.function (keyword arguments are for a function)")
    if cfg.distributed.async_collectives and (e.kind != "builtin" or cfg.parallelism.strategy != Strategy.DDP):
        raise ConfigError("distributed.async_collectives=true: a test mode of the built-in loop with "
                          f"parallelism.strategy=ddp (here: entrypoint {e.kind}, strategy {cfg.parallelism.strategy.value}); "
                          "set it to false")
    if e.kind != "builtin":
        _validate_scaling(cfg)
        return  # data.*, model.* and optim.* configure the built-in loop only
    if cfg.model.factory is None and cfg.model.d_model % cfg.model.n_head:
        raise ConfigError(
            f"model.d_model={cfg.model.d_model} must be divisible by model.n_head={cfg.model.n_head}"
        )
    if cfg.parallelism.strategy == Strategy.FSDP and cfg.data.global_batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"parallelism.strategy=fsdp: data.global_batch_size={cfg.data.global_batch_size} must be divisible by "
            f"scaling.num_workers={cfg.scaling.num_workers} (every rank trains on an equal slice of each batch)"
        )
    if cfg.data.global_batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )
    _validate_scaling(cfg)
    _validate_accumulation(cfg)
    if cfg.model.factory is not None and ":" not in cfg.model.factory:
        raise ConfigError(f'model.factory={cfg.model.factory!r}: expected "pkg.module:function"')


def _validate_accumulation(cfg: Config) -> None:
    """train.grad_accum_steps splits each rank's batch into equal micro-batches, at the full size
    and at every smaller size an elastic run may shrink to (those dividing the global batch)."""
    n, b = cfg.train.grad_accum_steps, cfg.data.global_batch_size
    smallest = cfg.scaling.min_workers or cfg.scaling.num_workers
    for w in range(cfg.scaling.num_workers, smallest - 1, -1):
        if b % w == 0 and (b // w) % n:
            at = "" if w == cfg.scaling.num_workers else f" (scaling.min_workers={smallest} allows {w} ranks)"
            raise ConfigError(
                f"train.grad_accum_steps={n} must divide the per-rank batch data.global_batch_size / "
                f"scaling.num_workers = {b}/{w} = {b // w}{at}"
            )


def _validate_snapshots(cfg: Config) -> None:
    """In-memory snapshots capture the built-in loop's state, or what a function passes to
    ctx.save (sharded FSDP state too: each rank its own slices); a script's state is out of our reach."""
    if not cfg.checkpoint.memory_every_steps:
        return
    where = f"checkpoint.memory_every_steps={cfg.checkpoint.memory_every_steps}"
    if cfg.entrypoint.kind == "script":
        raise ConfigError(f"{where}: in-memory snapshots need the built-in training loop or a function's ctx.save "
                          "(a script's state is out of their reach); set it to 0")


STALL_DIAGNOSIS_S = 60.0  # after a stall is declared: Flight Recorder and stacks (<= 15 s), node checks, margin


def _validate_timeouts(cfg: Config) -> None:
    """torch's collective timeout must outlast our stall watchdog and its diagnosis: otherwise
    NCCL's watchdog aborts the process first and a hang is recorded as a death, with no culprit."""
    h = cfg.hang
    if not h.enabled:
        return
    need = max(h.timeout_s, h.first_step_timeout_s) + STALL_DIAGNOSIS_S
    if cfg.distributed.timeout_s < need:
        longest = "hang.first_step_timeout_s" if h.first_step_timeout_s >= h.timeout_s else "hang.timeout_s"
        raise ConfigError(f"distributed.timeout_s={cfg.distributed.timeout_s:g} would let torch abort a hung "
                          f"collective before the stall watchdog ({longest}={max(h.timeout_s, h.first_step_timeout_s):g}"
                          f" + {STALL_DIAGNOSIS_S:g} s to diagnose) names the culprit; expected at least {need:g}, "
                          f"or lower the hang timeouts")


def _validate_scaling(cfg: Config) -> None:
    if cfg.scaling.min_workers is not None and cfg.scaling.min_workers > cfg.scaling.num_workers:
        raise ConfigError(f"scaling.min_workers={cfg.scaling.min_workers} is above scaling.num_workers="
                          f"{cfg.scaling.num_workers}")
    if cfg.scaling.cpus_per_worker <= 0 and cfg.scaling.gpus_per_worker <= 0:
        raise ConfigError("scaling.cpus_per_worker and scaling.gpus_per_worker are both 0; a worker needs one of them")


def webhook_problem(url: str) -> str | None:
    """Why `url` cannot receive alerts as a POST, or None when it is an http(s) URL with a host."""
    expected = "expected an http:// or https:// URL with a host (null for no webhook)"
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"{expected}; it contains spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        return f"{expected}; {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return expected
    return None


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: expected key.path=value")
    value = override_value(text, f"override {key.strip()}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def override_value(text: str, where: str) -> Any:
    """The value of `key=text`, parsed as YAML; text that is not valid YAML stays a string."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except (_Unbounded, RecursionError):
        return parse_yaml(text, where)  # raises the one-line error
    except yaml.YAMLError:
        return text


# --- storing: nothing secret is stored --------------------------------------------------

REDACTED = "<redacted>"
# Key names whose values are secrets, judged on their words (api_key, AccountKey, clientSecret):
# the last word (before a suffix like _url or _id) names the secret. Words, not substrings, so
# max_keys, key_dim, num_key_value_heads, tokenizer, max_tokens and eos_token are not secrets.
SECRET_WORDS = {"secret", "secrets", "token", "password", "passwd", "pw", "pwd", "passphrase", "credential",
                "credentials", "creds", "key", "apikey", "accesskey", "accountkey", "secretkey", "privatekey",
                "auth", "authorization", "cookie", "webhook", "dsn", "connectionstring", "connstr"}
SECRET_PHRASES = (("connection", "string"), ("conn", "str"))
_SUFFIXES = {"url", "uri", "id", "value", "string", "str", "b64", "base64", "hex"}
_TOKEN_NAMES = {"pad", "bos", "eos", "unk", "sep", "cls", "mask", "start", "end"}  # tokenizer vocabulary
SECRET_SECTIONS = {"storage_options"}  # everything inside: credentials, endpoints with tokens, ...
_SECRET_QUERY = {"sig", "signature"}  # Azure SAS / presigned URL parameters, besides SECRET_WORDS

_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
_CONN_STRING_SECRET = re.compile(r"(?i)\b(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)=[^;\s]*")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s]+)=([^&#\s]*)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)


def is_secret_name(name: Any) -> bool:
    words = [w.lower() for w in _WORD.findall(str(name))]
    if any(tuple(words[i:i + len(p)]) == p for p in SECRET_PHRASES for i in range(len(words))):
        return True
    if len(words) > 1 and words[-1] in _SUFFIXES:
        words = words[:-1]
    if not words:
        return False
    if words[-1] == "token" and len(words) > 1 and words[-2] in _TOKEN_NAMES:
        return False
    return words[-1] in SECRET_WORDS or "".join(words) in SECRET_WORDS


def scrub_text(text: str) -> str:
    """`text` without credentials embedded in it: URL userinfo (user:pass@) is removed; secret
    query parameters, connection-string keys, AWS key ids and private-key blocks are redacted."""
    text = _USERINFO.sub(r"\1", text)
    text = _CONN_STRING_SECRET.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _QUERY_PARAM.sub(_scrub_param, text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _PEM_BLOCK.sub(lambda m: f"-----BEGIN {m.group(1)}PRIVATE KEY-----{REDACTED}", text)


def _scrub_param(m: re.Match) -> str:
    name = m.group(2)
    secret = is_secret_name(name) or name.lower() in _SECRET_QUERY or name.lower().endswith("-signature")
    return f"{m.group(1)}{name}={REDACTED}" if secret and m.group(3) else m.group(0)


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


def redact(obj: Any, path: tuple = ()) -> Any:
    """Copy of a plain config fit to store: values of secret-named keys, of `*.storage_options` and
    of telemetry.alert_webhook become REDACTED, leaf by leaf so `a.b.c=value` overrides can give
    them back on resume (`driver.config_for` asks for every REDACTED leaf); other strings lose the
    credentials embedded in them (scrub_text). A list holding a secret is redacted whole: a
    resume can only give it back whole."""
    if isinstance(obj, dict):
        return {k: _redact_item(v, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [redact(v, path) for v in obj]
        return REDACTED if any(_holds_redaction(v) for v in items) else items
    return scrub_text(obj) if isinstance(obj, str) else obj


def _redact_item(value: Any, path: tuple) -> Any:
    key = path[-1]
    secret = (is_secret_name(key) or str(key) in SECRET_SECTIONS
              or tuple(map(str, path)) == ("telemetry", "alert_webhook"))
    return _redact_all(value) if secret else redact(value, path)


def _redact_all(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if value is None or isinstance(value, bool) or value in ("", []):  # nothing to hide, nothing to give back
        return value
    return REDACTED


def _holds_redaction(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_redaction(v) for v in value.values())
    return value == REDACTED


def redact_override(item: str) -> str:
    """A `key.path=value` override as it may be stored (in the run's command line)."""
    key, eq, text = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        return scrub_text(item)
    try:
        value = override_value(text, "override")
    except ConfigError:
        return f"{key}={REDACTED}"
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    red = redact(nested)
    for part in parts:
        red = red[part]
    if red == value:
        return item
    if isinstance(red, str) and override_value(red, "override") == red:
        return f"{key}={red}"
    return f"{key}={json.dumps(red)}"
