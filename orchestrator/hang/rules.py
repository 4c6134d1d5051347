"""Hang diagnosis from heartbeats: pure functions, so every rule is tested one case at a time.

Each rank's heartbeat carries its step, its phase (data, forward, backward, optimizer, eval,
checkpoint), how many collectives it has entered and completed, when it was sent, and its pid (so
the process of a rank whose beats are late can be looked at: procstate.py).
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


def late_after_s(heartbeat_s: float) -> float:
    """A rank whose last heartbeat is older than this is late: its process is worth a look
    (procstate.py). Late proves nothing by itself: a busy host delays beats, and a look at a
    process that runs costs one small task and names no one, so half a beat of slack is enough."""
    return 1.5 * heartbeat_s


def stopped_for(samples: list[dict], since: float, *, span_s: float) -> dict | None:
    """Proof of a frozen process: the latest looks at it, all taken after its last heartbeat
    (`since`, the same node's clock), are state 'T' and span at least `span_s`. Returns the last
    of them, or None. 't' (a debugger's or py-spy's tracing stop) is no proof."""
    run: list[dict] = []
    for s in sorted(samples, key=lambda s: s["at"]):
        if s["at"] > since:
            run = run + [s] if s["state"] == "T" else []
    return run[-1] if len(run) >= 2 and run[-1]["at"] - run[0]["at"] >= span_s else None


def beat_pid(beat: dict) -> int | None:
    """The process whose heartbeats these are (in script mode the worker beats for its script)."""
    return beat.get("beat_pid", beat.get("pid"))


def process_note(s: dict) -> str | None:
    """What a look at a rank's process adds to a stall report, when it says something."""
    pid, state = s["pid"], s["state"]
    where = f" in {s['wchan']}" if s.get("wchan") else ""
    return {
        "T": f"process stopped (state T: SIGSTOP or job control), pid {pid}",
        "t": f"process in a tracing stop (state t: a debugger or py-spy), pid {pid}",
        "D": f"process in uninterruptible sleep (state D{where}: stuck in the kernel, e.g. a GPU driver), pid {pid}",
        "Z": f"process gone (state Z: it exited, not yet reaped), pid {pid}",
        "X": f"process gone (state X: dead), pid {pid}",
        "gone": f"process gone (no /proc entry), pid {pid}",
    }.get(state)


def attribute(beats: dict[int, dict], *, now: float, heartbeat_s: float, nodes: dict[int, str] | None = None) -> dict:
    """Who holds the group up, and why. Returns {"culprits": [...], "reason", "verdict", "ranks"}.

    verdict: "stopped" (heartbeats stopped: frozen process or dead host), "missing_collective"
    (ranks never entered the collective the others wait in), "stuck" (a rank busy outside any
    collective: data loading, checkpoint), or "undecided" (everyone waits in the same collective).
    """
    ranks = _ranks(beats, now, nodes)
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


def attribute_stopped(beats: dict[int, dict], stopped: dict[int, dict], *, now: float,
                      nodes: dict[int, str] | None = None) -> dict:
    """The report for ranks whose processes are proven stopped (`stopped`: rank -> its last look,
    state 'T'): verdict "stopped", before their heartbeats count as stale. A script's process
    can be stopped while its worker still beats for it: that rank's reason says so."""
    ranks = _ranks(beats, now, nodes)
    silent = [r for r in sorted(stopped) if stopped[r]["pid"] == beat_pid(beats[r])]
    scripts = [r for r in sorted(stopped) if r not in silent]
    why = []
    if silent:
        ages = ", ".join(f"rank {r}: {ranks[r]['age_s']}s ago" for r in silent)
        why.append(f"heartbeats stopped ({ages})")
    if scripts:
        why.append(f"the script of rank(s) {', '.join(map(str, scripts))} made no progress (its worker still beats)")
    why += [f"rank {r}: {process_note(s)}" for r, s in sorted(stopped.items())]
    return _report("stopped", sorted(stopped), ranks, "; ".join(why))


def _ranks(beats: dict[int, dict], now: float, nodes: dict[int, str] | None) -> dict[int, dict]:
    nodes = nodes or {}
    return {r: {**b, "node": nodes.get(r), "age_s": round(now - b["time"], 1),
                "waiting": b["coll_entered"] > b["coll_completed"]}
            for r, b in sorted(beats.items())}


def _report(verdict: str, culprits: list[int], ranks: dict, reason: str) -> dict:
    return {"verdict": verdict, "culprits": culprits, "reason": reason,
            "culprit_nodes": sorted({ranks[r]["node"] for r in culprits if ranks[r]["node"]}), "ranks": ranks}


def flight_recorder_summary(dumps: dict[int, str | None], world: int, known: dict[int, str] | None = None) -> dict:
    """torch Flight Recorder's view of the same stall: per rank, the last collective it entered on
    each process group; ranks behind the others on a group are missing from the collective the
    others wait in. `dumps`: rank -> the JSON text of `_dump_fr_trace_json`, None if the rank had
    no recorder, absent if it never answered (a frozen process). `known`: rank -> why it could not
    answer (e.g. "stopped (state T)"), for ranks not waited for."""
    known = known or {}
    ranks: dict[int, dict] = {}
    for r in range(world):
        if r not in dumps:
            ranks[r] = {"dump": "no answer", **({"why": known[r]} if r in known else {})}
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
    why: dict[str, list[int]] = {}
    for r in silent:
        why.setdefault(ranks[r].get("why", "not answering"), []).append(r)
    parts += [f"no dump from rank(s) {', '.join(map(str, rs))} ({w})" for w, rs in why.items()]
    if not parts:
        have = [r for r, b in ranks.items() if b["dump"] == "ok"]
        parts.append("every rank entered the same collectives" if have else "no rank had a recorder")
    culprits = sorted({r for rs in missing.values() for r in rs} | set(silent))
    return {"ranks": ranks, "missing": missing, "waiting": waiting, "silent": silent, "culprits": culprits,
            "summary": "; ".join(parts)}


def passed_nodes(checks: dict | None) -> list[str]:
    """The suspect nodes of a stall's node checks (actors/node_check.py check_nodes) that answered
    every check with no problem and whose all-reduce probe worked. A check that failed, timed out
    or was never run is no pass."""
    if not isinstance(checks, dict) or checks.get("error"):
        return []
    probes = {p.get("a"): p for p in checks.get("probes", [])}
    return [n for n, e in checks.get("nodes", {}).items()
            if e.get("role") == "suspect" and not e.get("error") and e.get("problems") == []
            and all(k in e for k in ("host", "gpu", "compute")) and probes.get(n, {}).get("ok") is True]
