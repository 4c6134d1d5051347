"""Hang diagnosis from heartbeats: pure functions, so every rule is tested one case at a time.

Each rank's heartbeat carries its step, its phase (data, forward, backward, optimizer, eval,
checkpoint), how many collectives it has entered and completed, and when it was sent.
"""

from __future__ import annotations

import json
import statistics

PHASES = ("start", "data", "forward", "backward", "optimizer", "eval", "checkpoint", "done")


def stall_threshold_s(timeout_s: float, step_times: list[float], factor: float) -> float:
    """A stall is declared after max(hang.timeout_s, factor x the recent median step time)."""
    return max(timeout_s, factor * statistics.median(step_times)) if step_times else timeout_s


def stale_after_s(heartbeat_s: float) -> float:
    """A rank whose last heartbeat is older than this has stopped (3 missed beats, and slack for a busy host)."""
    return 3 * heartbeat_s + 2.0


def attribute(beats: dict[int, dict], *, now: float, heartbeat_s: float, nodes: dict[int, str] | None = None) -> dict:
    """Who holds the group up, and why. Returns {"culprits": [...], "reason", "verdict", "ranks"}.

    verdict: "stopped" (heartbeats stopped: frozen process or dead host), "missing_collective"
    (ranks never entered the collective the others wait in), "stuck" (a rank busy outside any
    collective: data loading, checkpoint), or "undecided" (everyone waits in the same collective).
    """
    nodes = nodes or {}
    ranks = {
        r: {**b, "node": nodes.get(r), "age_s": round(now - b["time"], 1),
            "waiting": b["coll_entered"] > b["coll_completed"]}
        for r, b in sorted(beats.items())
    }
    stale_after = stale_after_s(heartbeat_s)
    stopped = [r for r, b in ranks.items() if b["age_s"] > stale_after]
    if stopped:
        ages = ", ".join(f"rank {r}: {ranks[r]['age_s']}s ago" for r in stopped)
        return _report("stopped", stopped, ranks, f"heartbeats stopped ({ages}): a frozen process or a lost host")
    top = max(b["coll_entered"] for b in ranks.values())
    behind = [r for r, b in ranks.items() if b["coll_entered"] < top]
    waiting = [r for r, b in ranks.items() if b["waiting"] and b["coll_entered"] == top]
    if behind and waiting:
        where = ", ".join(f"rank {r} in {ranks[r]['phase']} at step {ranks[r]['step']}" for r in behind)
        return _report("missing_collective", behind, ranks,
                       f"never entered collective #{top} that rank(s) {', '.join(map(str, waiting))} wait in ({where})")
    busy = [r for r, b in ranks.items() if not b["waiting"] and b["phase"] in ("data", "checkpoint", "eval")]
    if busy:
        where = ", ".join(f"rank {r} in {ranks[r]['phase']}" for r in busy)
        return _report("stuck", busy, ranks, f"stuck outside any collective ({where})")
    return _report("undecided", [], ranks, f"every rank waits in collective #{top}: the evidence does not single "
                   "one out (a network or NCCL problem between nodes?)")


def _report(verdict: str, culprits: list[int], ranks: dict, reason: str) -> dict:
    return {"verdict": verdict, "culprits": culprits, "reason": reason,
            "culprit_nodes": sorted({ranks[r]["node"] for r in culprits if ranks[r]["node"]}), "ranks": ranks}


def flight_recorder_summary(dumps: dict[int, str | None], world: int) -> dict:
    """torch Flight Recorder's view of the same stall: per rank, the last collective it entered on
    each process group; ranks behind the others on a group are missing from the collective the
    others wait in. `dumps`: rank -> the JSON text of `_dump_fr_trace_json`, None if the rank had
    no recorder, absent if it never answered (a frozen process)."""
    ranks: dict[int, dict] = {}
    for r in range(world):
        if r not in dumps:
            ranks[r] = {"dump": "no answer"}
            continue
        if dumps[r] is None:
            ranks[r] = {"dump": "no recorder"}
            continue
        entries = [e for e in json.loads(dumps[r]).get("entries", []) if not e.get("is_p2p")]
        last: dict[str, dict] = {}
        for e in entries:
            group = str((e.get("process_group") or [e.get("pg_id")])[0])
            if group not in last or e["collective_seq_id"] > last[group]["seq"]:
                last[group] = {"seq": e["collective_seq_id"], "op": e.get("profiling_name"),
                               "sizes": e.get("input_sizes"), "state": e.get("state")}
        ranks[r] = {"dump": "ok", "entries": len(entries), "last": last}
    missing: dict[str, list[int]] = {}
    waiting: dict[str, dict] = {}
    for group in sorted({g for b in ranks.values() for g in b.get("last", {})}):
        seqs = {r: b["last"].get(group, {"seq": 0})["seq"] for r, b in ranks.items() if b["dump"] == "ok"}
        top = max(seqs.values())
        behind = sorted(r for r, s in seqs.items() if s < top)
        if behind:
            missing[group] = behind
            ahead = next(r for r, s in seqs.items() if s == top)
            waiting[group] = {"seq": top, **{k: ranks[ahead]["last"][group][k] for k in ("op", "sizes")}}
    silent = sorted(r for r, b in ranks.items() if b["dump"] == "no answer")
    # torch numbers every collective of a group (DDP's start-up broadcasts too), not one per step
    parts = [f"group {g}: rank(s) {', '.join(map(str, rs))} never entered torch's collective #{waiting[g]['seq']} "
             f"({waiting[g]['op']})" for g, rs in missing.items()]
    if silent:
        parts.append(f"no dump from rank(s) {', '.join(map(str, silent))} (not answering)")
    if not parts:
        have = [r for r, b in ranks.items() if b["dump"] == "ok"]
        parts.append("every rank entered the same collectives" if have else "no rank had a recorder")
    culprits = sorted({r for rs in missing.values() for r in rs} | set(silent))
    return {"ranks": ranks, "missing": missing, "waiting": waiting, "silent": silent, "culprits": culprits,
            "summary": "; ".join(parts)}
