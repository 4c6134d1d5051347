"""The `diagnose` view: stalls and stragglers as the store keeps them, with their evidence and
what the controller did about each."""

from __future__ import annotations

import json

from common.labels import node_label
from orchestrator.hang.procstate import MEANING
from orchestrator.run_views import out, when
from orchestrator.store import Store, open_store


def diagnoses(store: Store, run_id: str) -> list[dict]:
    """Stall and straggler events with their evidence and the action that followed."""
    attempts = store.attempts(run_id)
    out_rows = []
    for e in store.events(run_id):
        if e["kind"] not in ("stall", "straggler"):
            continue
        d = e["data"]
        row = {"time": e["time"], "kind": e["kind"], "step": e["step"], "rank": e["rank"], "message": e["message"]}
        placement = f"; {d['placement']}" if d.get("placement") else ""
        if e["kind"] == "stall":
            later = [a for a in attempts if a["started_at"] > e["time"]]
            culprit = d.get("ranks", {}).get(str(e["rank"])) if e["rank"] is not None else None
            row.update(verdict=d.get("verdict"), culprits=d.get("culprits", []), nodes=d.get("culprit_nodes", []),
                       phase=culprit.get("phase") if culprit else None,
                       collective=culprit.get("coll_entered") if culprit else None,
                       stalled_s=d.get("stalled_s"), evidence=d.get("ranks", {}),
                       flight_recorder=d.get("flight_recorder"), node_checks=d.get("node_checks"),
                       action=(f"restarted (attempt {later[0]['attempt']}, from step {later[0]['resumed_from_step']})"
                               if later else "the run stopped") + placement)
        else:
            replaced = next((a for a in attempts if a["cause"] == "straggler" and a["rank"] == e["rank"]
                             and (a["ended_at"] or 0) >= e["time"]), None)
            done = next((a for a in attempts if a["attempt"] == replaced["attempt"] + 1), None) if replaced else None
            row.update(verdict="straggler", culprits=[e["rank"]], evidence=d,
                       action=(f"replaced: restarted (attempt {done['attempt']}, from step {done['resumed_from_step']})"
                               + placement) if done else "reported")
        out_rows.append(row)
    return out_rows


def process_text(look: dict | None) -> str:
    """The kernel's view of a rank's process, when the watchdog looked (hang/procstate.py)."""
    if not look:
        return ""
    wchan = f" in {look['wchan']}" if look.get("wchan") else ""
    return f"  process {look['pid']} state {look['state']} ({MEANING.get(look['state'], '?')}{wchan})"


def node_check_lines(checks: dict) -> list[str]:
    """One line per checked node and per probe, then the problems found."""
    lines = []
    for node, n in checks.get("nodes", {}).items():
        if "error" in n:
            lines.append(f"node {node_label(node)} ({n.get('role', '?')}): check failed: {n['error']}")
            continue
        gpu = n.get("gpu", {})
        gpus = f"{len(gpu.get('gpus', []))} GPU(s)" if gpu.get("available") else "no GPU"
        host, comp = n.get("host", {}), n.get("compute", {})
        lines.append(f"node {node_label(node)} ({n.get('role')}, {n.get('hostname')}): {gpus}, memory "
                     f"{host.get('memory_percent', '?')}% used, load {(host.get('load') or ['?'])[0]}, "
                     f"compute {comp.get('gflops', '?')} GFLOP/s on {comp.get('device', '?')}")
    for pr in checks.get("probes", []):
        where = f"{node_label(pr['a'])} <-> {node_label(pr['b'])}" + (" (same node)" if pr.get("same_node") else "")
        lines.append(f"all-reduce probe {where}: " + (
            f"{pr['latency_ms']:.2f} ms latency, {pr['bandwidth_mb_s']:.0f} MB/s ({pr['backend']})" if pr.get("ok")
            else f"FAILED: {pr.get('error')}"))
    lines += [f"problem: {x}" for x in checks.get("problems", [])] or ["no problem found on the checked nodes"]
    return lines


def cmd_diagnose(args, argv) -> int:
    store = open_store()
    run = store.run(args.run)
    rows = diagnoses(store, run["id"])
    if args.json:
        out(json.dumps({"run": run["id"], "events": rows}, indent=1))
        return 0
    if not rows:
        out(f"no stalls or stragglers recorded for {run['id']}")
        return 0
    for r in rows:
        out(f"{when(r['time'])}  {r['kind']} at step {r['step']}: {r['message']}")
        out(f"  verdict {r['verdict']}; action: {r['action']}")
        if r["kind"] == "stall":
            for rank, b in sorted(r["evidence"].items(), key=lambda kv: int(kv[0])):
                out(f"  rank {rank:>3}  node {str(b.get('node') or '-')[:12]:<12}  step {b['step']:>6}  "
                    f"phase {b['phase']:<10}  collectives entered {b['coll_entered']} done {b['coll_completed']}  "
                    f"last heartbeat {b['age_s']}s ago{process_text(b.get('process'))}")
            if r["flight_recorder"]:
                out(f"  flight recorder: {r['flight_recorder']['summary']}"
                    + (f" (dumps in {r['flight_recorder']['files']})" if r["flight_recorder"].get("files") else ""))
                stacks = r["flight_recorder"].get("stacks") or {}
                for rank in [str(c) for c in r["culprits"]] or sorted(stacks)[:1]:
                    if stacks.get(rank):
                        out(f"  Python stacks of rank {rank} (py-spy):")
                        for line in stacks[rank].splitlines():
                            out(f"    {line}")
            if r["node_checks"]:
                for line in node_check_lines(r["node_checks"]):
                    out(f"  {line}")
    return 0
