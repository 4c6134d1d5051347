"""Every check `launch` makes before training, without training (`orchestrator validate`).

`preflight(cfg)` is the part launch runs before it touches Ray (first problem raised);
`run_checks(cfg)` runs them all, plus what launch finds out later (checkpoint destination,
Prometheus port, cluster resources), and reports each as ok / skipped / error.
"""

from __future__ import annotations

import os
import secrets
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, ResourceError, UserError
from orchestrator.config import Config, scrub_text, webhook_problem


@dataclass(frozen=True)
class Check:
    status: str  # "ok" | "skipped" | "error"
    message: str


def preflight(cfg: Config) -> None:
    """Checks that need no cluster: fail in a second, not after Ray has started."""
    check_data(cfg)
    check_model(cfg)


def run_checks(cfg: Config, *, address: str | None = None) -> list[Check]:
    """All checks, each reported; a check's UserError is its problem, anything else a problem too."""
    results = []
    for name, check in (("data", check_data), ("model", check_model), ("checkpoint", check_checkpoint),
                        ("prometheus", check_prometheus), ("webhook", check_webhook),
                        ("cluster", lambda c: check_cluster(c, address))):
        try:
            results.append(check(cfg))
        except UserError as e:
            results.append(Check("error", str(e)))
        except Exception as e:  # noqa: BLE001 (reported as this check's problem, the others still run)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            results.append(Check("error", f"{name} check failed: {type(e).__name__}: {first}"))
    return results


def check_data(cfg: Config) -> Check:
    if cfg.entrypoint.kind != "builtin" and not cfg.data.uri:
        return Check("skipped", f"data: the {cfg.entrypoint.kind} reads its own data (data.uri not set)")
    if not cfg.data.uri:
        raise ConfigError("data.uri: required; point it at a dataset made by `orchestrator data prepare`")
    from dataloading.index import read_index

    index = read_index(cfg.data.uri, storage_options=cfg.data.storage_options)
    n = index.num_sequences("train")
    if n < cfg.data.global_batch_size:
        raise UserError(
            f"{cfg.data.uri}: train split has {n} sequences, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size})"
        )
    return Check("ok", f"data.uri {scrub_text(cfg.data.uri)}: {n} train sequences of {index.seq_len} tokens, "
                       f"global batch {cfg.data.global_batch_size}")


def check_model(cfg: Config) -> Check:
    e = cfg.entrypoint
    if e.kind == "script":
        if not Path(e.script).is_file():
            raise ConfigError(f"entrypoint.script: no such file {e.script} (a relative path is taken from the "
                              "config file's folder)")
        return Check("ok", f"entrypoint.script {e.script} exists")
    if e.kind == "function":
        from orchestrator.entrypoints import load_function  # imports the user's module (and so torch)

        load_function(e.function, e.workdir, e.kwargs)
        return Check("ok", f"entrypoint.function {e.function} imports and takes ctx")
    if not cfg.model.factory:
        m = cfg.model
        return Check("ok", f"model: built-in GPT, {m.n_layer} layers, {m.n_head} heads, d_model {m.d_model}")
    from orchestrator.gpt import load_factory

    load_factory(cfg.model.factory)
    return Check("ok", f"model.factory {cfg.model.factory} imports")


def check_checkpoint(cfg: Config) -> Check:
    """Write, read back and delete a marker where checkpoints go, with the storage options;
    directories created for it are removed again."""
    from checkpointing.storage import open_fs
    from orchestrator.store import home

    uri = cfg.checkpoint.uri or os.path.join(home(), "checkpoints")
    label = (f"checkpoint.uri={scrub_text(uri)!r}" if cfg.checkpoint.uri
             else f"checkpoint.uri (default: under {uri})")
    fs, root = open_fs(uri, cfg.checkpoint.storage_options)
    root = root.rstrip("/") or "/"
    local = "file" in fs.protocol or "local" in fs.protocol
    created = _missing_dirs(root) if local else []  # remote stores have no directories to create
    marker = f"{root.rstrip('/')}/.orchestrator-validate-{secrets.token_hex(4)}"
    try:
        if created:
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(marker, b"ok")
        if fs.cat_file(marker) != b"ok":
            raise OSError("the marker read back different bytes")
        fs.rm_file(marker)
    except Exception as e:  # noqa: BLE001 (any failure here is the destination's)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{label}: cannot write there: {type(e).__name__}: {first}") from None
    finally:
        for path in created:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                pass
    return Check("ok", f"{label}: writable (wrote and deleted a marker)")


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_prometheus(cfg: Config) -> Check:
    t = cfg.telemetry
    if t.prometheus_port is None:
        return Check("ok", "telemetry.prometheus_port: null, no metrics endpoint")
    if t.prometheus_port == 0:
        return Check("ok", f"telemetry.prometheus_port: 0, a free port on {t.prometheus_host} at start")
    where = f"telemetry.prometheus_port={t.prometheus_port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(t.prometheus_host, t.prometheus_port,
                                                          type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does
            s.bind(addr)
            s.listen(1)
    except OSError as e:
        raise UserError(f"{where}: cannot listen on {t.prometheus_host}:{t.prometheus_port}: "
                        f"{e.strerror or e}") from None
    return Check("ok", f"{where}: free on {t.prometheus_host}")


def check_webhook(cfg: Config) -> Check:
    url = cfg.telemetry.alert_webhook
    if url is None:
        return Check("ok", "telemetry.alert_webhook: null, alerts are stored only")
    problem = webhook_problem(url)
    if problem:
        raise ConfigError(f"telemetry.alert_webhook={scrub_text(url)!r}: {problem}")
    parts = urllib.parse.urlsplit(url)
    return Check("ok", f"telemetry.alert_webhook: an {parts.scheme} URL on {parts.hostname} (not called)")


def check_cluster(cfg: Config, address: str | None) -> Check:
    """Enough CPUs/GPUs on the cluster for the workers, and a node big enough for one worker."""
    from orchestrator import cluster

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        return Check("skipped", "cluster resources: no --address and no RAY_ADDRESS (launch would start a "
                                "local cluster on this machine)")
    import ray

    s = cfg.scaling
    bundle = cluster.bundle_for(s.cpus_per_worker, s.gpus_per_worker)
    need = {k: v * s.num_workers for k, v in bundle.items()}
    shown = scrub_text(address)
    connected_here = not ray.is_initialized()
    if connected_here:
        cluster.connect(address, dashboard=False)
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    finally:
        if connected_here:
            ray.shutdown()
    have = ", ".join(f"{total.get(k, 0):g} {k} ({free.get(k, 0):g} free)" for k in ("CPU", "GPU"))
    asked = (f"scaling.num_workers={s.num_workers} x {cluster._fmt(bundle)} = {cluster._fmt(need)}")
    short = [k for k, v in need.items() if total.get(k, 0) < v]
    if short:
        raise ResourceError(f"cluster at {shown}: {asked}, but it has {have} on {len(nodes)} node(s)")
    if not any(all(n.get(k, 0) >= v for k, v in bundle.items()) for n in nodes):
        raise ResourceError(f"cluster at {shown}: no node can hold one worker ({cluster._fmt(bundle)}); "
                            f"it has {have} on {len(nodes)} node(s)")
    return Check("ok", f"cluster at {shown}: {asked}; it has {have} on {len(nodes)} node(s)")
