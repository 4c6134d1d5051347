"""Connecting to Ray and reserving the workers' resources, with a deadline."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ResourceError
from common.labels import node_label, node_labels  # noqa: F401 (messages here and in callers)

NODE_ID_LABEL = "ray.io/node-id"


TOKEN_HINT = {
    True: " (with token authentication: the token must be the cluster's, as `ray get-auth-token` prints on its head)",
    False: " (if it uses token authentication, the default of Ray >= 2.59 clusters, put its token in"
           " ~/.ray/auth_token or RAY_AUTH_TOKEN)",
}


def use_token(address: str | None = None) -> bool:
    """Whether Ray will send a token, decided before Ray is imported (it reads RAY_AUTH_MODE
    once). A user's own RAY_AUTH_MODE stands. Else, with a token at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), the mode follows the cluster at `address`, asked
    first by a call that carries no token: a cluster with token authentication (Ray >= 2.59
    `ray start` under it) refuses a driver without one, and one without it cannot call back a
    driver that wants one, whose actors then die at once ("all references removed"). Ray 2.60
    itself turns token mode on whenever a token file exists, so a cluster that wants none gets
    RAY_AUTH_MODE=disabled. An embedded cluster (no address), or one that does not answer, gets
    token mode."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        return False
    wanted = wants_token(address) if address else None
    os.environ["RAY_AUTH_MODE"] = "disabled" if wanted is False else "token"
    return wanted is not False


def wants_token(address: str, timeout_s: float = 5.0) -> bool | None:
    """Whether the cluster at `address` (a dashboard URL or a GCS host:port) asks for a token;
    None when it cannot tell (no answer, a Ray Client or "auto" address)."""
    if address.startswith(("http://", "https://")):
        mode = dashboard_auth_mode(address, timeout_s)
        return None if mode is None else mode == "token"
    if address == "auto" or "://" in address:
        return None
    import grpc  # Ray's own dependency; it does not import Ray

    try:  # any GCS method: an empty request is valid for this one
        with grpc.insecure_channel(address) as channel:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout_s)
        return False
    except grpc.RpcError as e:
        return True if e.code() == grpc.StatusCode.UNAUTHENTICATED else None


# An embedded cluster without the dashboard: what Ray records only for the dashboard to show is
# CPU taken from the ranks, which on a machine they saturate is step time (docs/BENCHMARKS.md,
# "Launch overhead"). Names as in Ray 2.60's src/ray/common/ray_config_def.h.
LEAN_SYSTEM_CONFIG = {
    "task_events_report_interval_ms": 0,  # task state events (the dashboard's task pages, `ray list tasks`)
    "enable_metrics_collection": False,  # Ray's own metrics export (the dashboard's Grafana panels)
    "event_stats": False,  # per-handler event-loop statistics, for those metrics and debug dumps
}
# Read by Ray's Python daemons when they start (they inherit the driver's environment).
LEAN_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",  # the log monitor globs for new files every
    "LOG_NAME_UPDATE_INTERVAL_S": "1.0",  # LOG_NAME_UPDATE_INTERVAL_S, not every 0.1 s
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's node stats, read by the dashboard only
}


def connect(address: str | None, *, dashboard: bool) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start an embedded cluster on 127.0.0.1
    (`ray.shutdown()` stops the one and only disconnects from the other). An embedded cluster
    without the dashboard runs lean: none of what Ray records only for the dashboard."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # Ray maps 127.0.0.1 to the host's routable IP unless this is set before it is imported;
        # with it, the embedded cluster and the rendezvous stay on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    common = dict(namespace="orchestrator", logging_level=logging.ERROR, log_to_driver=True)
    if address:
        token = use_token()
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ResourceError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}"
                                f"{TOKEN_HINT[token]}") from None
        return
    lean = not dashboard  # the dashboard asked for: everything it shows stays on
    with _environment(LEAN_ENV if lean else {}):
        ray.init(
            address="local",  # never attach to some other cluster on this machine by accident
            _node_ip_address="127.0.0.1",
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _system_config=dict(LEAN_SYSTEM_CONFIG) if lean else None,
            **common,
        )


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in os.environ (where the user has not set them) while the cluster's processes
    start, which inherit them; this process's environment is as it was afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


SIGN_IN = (" (Ray token authentication is on: when the page asks for a token, paste what `ray get-auth-token` "
           "prints; the dashboard keeps it as a cookie)")


def sign_in_hint(url: str | None = None) -> str:
    """How to open the dashboard when Ray's token authentication is on (Ray >= 2.59 `ray start`
    clusters): every API call of the page answers 401 until the token is given. The dashboard at
    `url` says whether it is on (a public endpoint); without one, this machine's settings do."""
    if url:
        mode = dashboard_auth_mode(url)
        if mode is not None:
            return SIGN_IN if mode == "token" else ""
    if os.environ.get("RAY_AUTH_MODE") == "token" or (Path.home() / ".ray" / "auth_token").is_file():
        return SIGN_IN
    return ""


def dashboard_auth_mode(url: str, timeout_s: float = 5.0) -> str | None:
    """"token" or "disabled", as the dashboard's /api/authentication_mode says; None if it cannot be asked."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/authentication_mode", timeout=timeout_s) as r:
            return str(json.loads(r.read()).get("authentication_mode", "")).lower() or None
    except Exception:  # an older Ray without the endpoint, a proxy in between: fall back to the guess
        return None


def dashboard_url() -> str | None:
    import ray

    url = ray.get_runtime_context().worker.node.address_info.get("webui_url") if ray.is_initialized() else None
    return f"http://{url}" if url else None


@dataclass(frozen=True)
class Placement:
    pg: object
    bundle_nodes: list[str]  # node id of each bundle


def bundle_for(cpus: float, gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def reserve(*, run_id: str, num_workers: int, cpus: float, gpus: float, timeout_s: float,
            avoid_nodes: list[str] = ()) -> Placement:
    """A placement group of one bundle per worker, packed onto few nodes, on none of `avoid_nodes`;
    fails clearly after timeout_s."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    bundle = bundle_for(cpus, gpus)
    # every node carries its id as a label; "!in(...)" keeps the bundles off the listed ones
    selector = [{NODE_ID_LABEL: f"!in({','.join(avoid_nodes)})"} for _ in range(num_workers)] if avoid_nodes else None
    pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK", name=f"{run_id}:workers",
                         bundle_label_selector=selector)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        avoiding = f" outside node(s) {node_labels(avoid_nodes)}" if avoid_nodes else ""
        raise ResourceError(
            f"cannot reserve {num_workers} workers x {_fmt(bundle)} (= {_fmt({k: v * num_workers for k, v in bundle.items()})})"
            f"{avoiding} within scaling.start_timeout_s={timeout_s:g}: the cluster has {_cluster_summary()}; "
            "lower scaling.num_workers / cpus_per_worker / gpus_per_worker, or add nodes"
        ) from None
    table = placement_group_table(pg)
    nodes = [table["bundles_to_node_id"][i] for i in range(num_workers)]
    return Placement(pg, nodes)


def release(placement: Placement | None) -> None:
    if placement is None:
        return
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(placement.pg)
    except Exception:  # already gone with the cluster
        pass


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def _cluster_summary() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    parts = [f"{total.get(k, 0):g} {k} in total ({free.get(k, 0):g} free)" for k in ("CPU", "GPU")]
    return ", ".join(parts) + f" on {len(alive)} node(s)"


def room_elsewhere(bundle: dict[str, float], avoid_nodes: list[str], workers: int = 1) -> bool:
    """Whether the live nodes not in `avoid_nodes` could hold `workers` bundles at all (by their
    total resources, free or not). When they cannot, waiting for room away from the avoided nodes
    is futile."""
    import ray

    return room_for(ray.nodes(), bundle, avoid_nodes, workers)


def room_for(nodes: list[dict], bundle: dict[str, float], avoid_nodes: list[str], workers: int) -> bool:
    """room_elsewhere on a given `ray.nodes()` list. Bundles are counted per node, as a placement
    group places them: two half-free nodes do not hold one worker."""
    fits = 0
    for n in nodes:
        if n.get("Alive") and n["NodeID"] not in avoid_nodes:
            fits += bundles_fit(n.get("Resources", {}), bundle) if bundle else workers
            if fits >= workers:
                return True
    return False


def bundles_fit(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many of a (non-empty) `bundle` one node of `resources` holds."""
    return min(int(resources.get(k, 0) // v) for k, v in bundle.items())


def node_ips() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
