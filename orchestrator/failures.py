"""What a rank's failed Ray call says: the failure's kind, and one line naming the rank, its node
and the cause (a dead process or node, the user's error, a non-finite loss, replicas that
disagree, an NCCL or CUDA failure named from its message)."""

from __future__ import annotations

import re

import ray

from common.errors import NonFiniteLoss, SilentCorruption, UserError
from orchestrator import cluster, peer_loss
from orchestrator.hang import nccl
from orchestrator.policy import Failure, FailureKind


def describe(e: Exception, r: int | None, phase: str, nodes: list[str], *, sdc_every: int) -> Failure:
    """Rank r's failed call (a RayTaskError or RayActorError); `nodes`: the node id of each rank."""

    def node(rank: int | None) -> str | None:
        return nodes[rank] if rank is not None and 0 <= rank < len(nodes) else None

    if isinstance(e, ray.exceptions.RayActorError):
        where = node(r)
        alive = where is None or where in cluster.node_ips()
        kind = FailureKind.DIED if alive else FailureKind.NODE_LOST
        # unavailable: Ray lost its connection but has not said the actor died (its node may be
        # going: a node crash reads like this until the GCS declares the node dead)
        unavailable = isinstance(e, ray.exceptions.ActorUnavailableError)
        what = (f"was lost with its node {where}" if not alive
                else f"on node {cluster.node_label(where)} became unreachable (its process or node is gone)"
                if unavailable else f"on node {cluster.node_label(where)} died (process killed or out of memory)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Failure(kind, f"rank {r} {what} during {phase}: {first}", rank=r, node_id=where,
                       data={"unconfirmed": True, "unreachable": True} if unavailable and alive else {})
    cause = e.cause if getattr(e, "cause", None) is not None else e
    if isinstance(cause, SilentCorruption):
        return _corruption(cause, node, sdc_every)
    lines = str(cause).strip().splitlines()
    kind, data = FailureKind.EXCEPTION, {}
    named = nccl.classify(str(cause))
    if isinstance(cause, UserError):
        kind = FailureKind.USER_ERROR
    elif isinstance(cause, NonFiniteLoss):
        kind = FailureKind.NON_FINITE
        data = {"batch": cause.step, "value": cause.value}
    elif named is not None:
        kind = FailureKind.GPU if named[0] in ("gpu_hardware", "cuda_error") else FailureKind.NCCL
        data = {"nccl": named[0], "meaning": named[1]}
    if kind in (FailureKind.EXCEPTION, FailureKind.NCCL) and peer_loss.is_peer_lost(str(cause)):
        data = {**data, "peer_lost": True}  # maybe a survivor's report: the group looks for the rank it lost
    text = getattr(cause, "user_traceback", None) or re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    msg = f"rank {r} failed during {phase}: {type(cause).__name__}: {lines[-1] if lines else ''}"
    if named is not None:
        msg += f" ({named[0]}: {named[1]}; node {cluster.node_label(node(r))})"
    return Failure(kind, msg, rank=r, node_id=node(r), traceback=f"--- rank {r} traceback ---\n" + text, data=data)


def _corruption(cause: SilentCorruption, node, sdc_every: int) -> Failure:
    """The replica check's verdict: the suspects, their nodes, and the last step known good."""
    nodes = sorted({n for n in (node(s) for s in cause.suspects) if n})
    data = {"step": cause.step, "suspects": cause.suspects, "suspect_nodes": nodes,
            "checksums": [str(c) for c in cause.checksums], "last_good": max(0, cause.step - sdc_every)}
    r = cause.suspects[0]
    return Failure(FailureKind.SDC, f"silent data corruption: replicas disagree after step {cause.step}; "
                   f"rank(s) {', '.join(map(str, cause.suspects))} on node(s) {cluster.node_labels(nodes)} "
                   "differ from the others", rank=r, node_id=node(r), data=data)
