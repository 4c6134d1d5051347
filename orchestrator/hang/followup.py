"""What follows a stall once the watchdog has named a culprit: torch's Flight Recorder buffers from
the ranks, and checks of the suspect nodes. Apart from the control loop, which only decides."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import ray

from actors.node_check import check_nodes
from orchestrator import cluster
from orchestrator.hang.rules import flight_recorder_summary

STACKS_WAIT_S = 15.0  # how long to wait for the ranks' dumps (each runs py-spy once)
STACK_LINES = 25  # of each rank's stacks kept in the stored report (all of it in the files)


def collect_flight_recorder(health, world: int, report: dict, folder: Path, heartbeat_s: float,
                            nudge: Callable[[int], None] | None = None) -> dict:
    """Ask every rank for its Flight Recorder buffer and its Python stacks (the heartbeat thread
    answers, even while the training thread is blocked in a collective), wait briefly, analyse,
    keep the dumps in `folder`. A script's stacks are its own process's, not the worker's.
    nudge(request): have the ranks serve the request now rather than at their next beats."""
    silent = known_silent(report)
    dumps: dict[int, str | None] = {}
    stacks: dict[int, str | None] = {}
    try:
        request = ray.get(health.request_dumps.remote(), timeout=5)
        if nudge is not None:
            nudge(request)
        deadline = time.monotonic() + max(STACKS_WAIT_S, 3 * heartbeat_s)  # py-spy takes a second or two
        while time.monotonic() < deadline:
            dumps = ray.get(health.take_dumps.remote(), timeout=5)
            if all(r in dumps for r in range(world) if r not in silent):
                break
            time.sleep(0.2)
        stacks = ray.get(health.take_stacks.remote(), timeout=5)
    except Exception as e:  # the monitor is gone: report what is known
        return {"summary": f"no dumps ({type(e).__name__})", "ranks": {}, "culprits": []}
    fr = flight_recorder_summary(dumps, world, known=silent)
    folder.mkdir(parents=True, exist_ok=True)
    for r, text in dumps.items():
        if text is not None:
            (folder / f"flight_recorder_rank{r}.json").write_text(text)
    for r, text in stacks.items():
        if text is not None:
            (folder / f"stacks_rank{r}.txt").write_text(text)
    fr["stacks"] = {r: "\n".join(text.splitlines()[:STACK_LINES]) for r, text in stacks.items() if text}
    fr["files"] = str(folder)
    return fr


def known_silent(report: dict) -> dict[int, str]:
    """rank -> why it cannot answer a dump request: its process was seen stopped or gone, or its
    heartbeats stopped (frozen or lost). Nobody waits for those."""
    silent = {}
    for r, info in report["ranks"].items():
        state = (info.get("process") or {}).get("state")
        if state == "T":
            silent[r] = "stopped (state T)"
        elif state in ("Z", "X", "gone"):
            silent[r] = "gone"
    if report["verdict"] == "stopped":
        for r in report["culprits"]:
            silent.setdefault(r, "heartbeats stopped")
    return silent


def check_suspects(report: dict, group_nodes: list[str], timeout_s: float, out) -> dict | None:
    """Node checks on the culprit's node (every node of the group when the verdict is undecided),
    compared with a healthy node: one of the group's if there is one, else any live node."""
    suspects = report["culprit_nodes"] or sorted(set(group_nodes))
    if not suspects:
        return None
    group = [n for n in dict.fromkeys(group_nodes) if n not in suspects]
    healthy = group + [n for n in cluster.node_ips() if n not in suspects and n not in group]
    out(f"checking node {cluster.node_labels(suspects)} (GPU, host pressure, compute, "
        f"all-reduce probe{' to ' + cluster.node_label(healthy[0]) if healthy else ''})")
    checks = check_nodes(suspects, healthy[:1], timeout_s=timeout_s)
    found = checks.get("problems") or []
    out("  node checks: " + ("; ".join(found) if found else f"no problem found ({checks.get('duration_s', 0):.1f}s)"))
    return checks
