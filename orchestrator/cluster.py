"""Connecting to Ray and reserving the workers' resources, with a deadline."""

from __future__ import annotations

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


def use_token() -> bool:
    """Whether Ray will send a token. Ray >= 2.59 clusters want one, and Ray sends it only when
    RAY_AUTH_MODE=token, which a user's shell rarely has: turned on here when a token is at hand.
    A cluster without authentication accepts a token too."""
    if not os.environ.get("RAY_AUTH_MODE") and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    return os.environ.get("RAY_AUTH_MODE") == "token"


def connect(address: str | None, *, dashboard: bool) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start an embedded cluster on 127.0.0.1
    (`ray.shutdown()` stops the one and only disconnects from the other)."""
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
    ray.init(
        address="local",  # never attach to some other cluster on this machine by accident
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        **common,
    )


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


def room_elsewhere(bundle: dict[str, float], avoid_nodes: list[str]) -> bool:
    """Whether some live node not in `avoid_nodes` could hold one worker's bundle at all (its total
    resources, free or not). When none can, waiting for room away from the avoided nodes is futile."""
    import ray

    for n in ray.nodes():
        if n.get("Alive") and n["NodeID"] not in avoid_nodes:
            have = n.get("Resources", {})
            if all(have.get(k, 0) >= v for k, v in bundle.items()):
                return True
    return False


def node_ips() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
