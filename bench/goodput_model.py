"""Effective training time (ETTR) at 1k, 16k and 100k GPUs: a first-order model fed by what
bench/goodput.py measured here (detection, recovery, checkpoint stall) and by published failure
rates. Writes docs/scale_goodput.png, prints a Markdown table, and one JSON object last.

    ETTR = 1 - delta / tau - (D + R + tau / 2 + c) / M

M: mean time to failure of the job (seconds); D: detection; R: recovery (teardown, reservation,
rendezvous, restore, first step); tau: checkpoint (or snapshot) interval in seconds of training;
delta: training stalled per checkpoint; c: how long a checkpoint takes to be stored after it is
taken (a failure in that window falls back one more interval: c / tau of the time, tau more).
Lost work is tau / 2 on average. tau is Young/Daly's optimum, tau* = sqrt(2 delta M) - delta,
but never below c + delta (an async writer holds at most one checkpoint in flight). With in-memory
snapshots every tau_m (stall delta_m) and durable checkpoints every tau_d, a failure whose
snapshot replica survived (fraction p) costs D + R_m + tau_m / 2, the rest D + R + tau_d / 2 + c;
each interval is Young/Daly's for the failures it serves (MTTF / p and MTTF / (1 - p)).

    python bench/goodput_model.py [--bench goodput.json [--system ours_standby]] [--out docs/scale_goodput.png]

--bench: a file whose last line is bench/goodput.py's JSON (its medians replace the defaults
below, which are the figures recorded in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600.0

# --- published failure rates (the job's mean time to failure at N GPUs) --------------------------
# Meta, "Revisiting Reliability in Large-Scale ML Research Clusters" (Kokolis et al., HPCA 2025,
# arXiv:2410.21680): MTTF 7.9 h for 1,024-GPU jobs, 1.8 h projected for 16,384.
META = {1024: 7.9 * HOUR, 16384: 1.8 * HOUR}
# Llama 3 (arXiv:2407.21783, sec. 3.3.4): 419 unexpected interruptions in 54 days on 16,384 H100s.
LLAMA3_MTTF = 54 * 24 * HOUR / 419
LLAMA3 = {"gpus": 16384, "ettr": 0.90, "mttf_h": round(LLAMA3_MTTF / HOUR, 2)}  # ">90% effective training time"
BYTEROBUST = {"gpus": 9600, "ettr": 0.97}  # ByteRobust (arXiv:2509.16293): 97% ETTR, 3-month job


def mttf(gpus: float, anchor: str = "meta") -> float:
    """Seconds. Failures scale with the GPU count: MTTF ~ 1/N from an anchor point. meta: through
    Meta's two points (log-log between them, ~1/N past 16,384); llama3: 1/N from Llama 3's 16,384;
    meta1k: 1/N from Meta's 1,024-GPU figure (the pessimistic bound)."""
    if anchor == "llama3":
        return LLAMA3_MTTF * 16384 / gpus
    if anchor == "meta1k":
        return META[1024] * 1024 / gpus
    (n0, m0), (n1, m1) = sorted(META.items())
    if gpus >= n1:
        return m1 * n1 / gpus
    slope = math.log(m1 / m0) / math.log(n1 / n0)
    return m0 * (gpus / n0) ** slope


# --- what a recovery and a checkpoint cost ----------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    detect_s: float  # failure -> known (a dead rank: at once; a hang: heartbeats)
    recover_s: float  # known -> first step done again (durable checkpoint)
    ckpt_stall_s: float  # training stalled per durable checkpoint (state copied to host memory)
    ckpt_lag_s: float  # checkpoint taken -> committed (upload)
    snapshot_stall_s: float | None = None  # in-memory snapshot: stall per snapshot
    snapshot_recover_s: float | None = None  # recovery from a peer's memory
    snapshot_survives: float = 0.99  # fraction of failures whose snapshot replica survived


def interval(stall_s: float, mttf_s: float, lag_s: float) -> float:
    """Young/Daly: sqrt(2 delta M) - delta, at least one checkpoint's own time (stall + lag)."""
    return max(math.sqrt(2 * stall_s * mttf_s) - stall_s, stall_s + lag_s, 1e-3)


def ettr(c: Costs, mttf_s: float, *, memory: bool = False) -> dict:
    """ETTR and its parts for a job with this MTTF (first order; clipped at 0)."""
    tau_d = interval(c.ckpt_stall_s, mttf_s, c.ckpt_lag_s)
    lost_d = tau_d / 2 + c.ckpt_lag_s
    overhead = c.ckpt_stall_s / tau_d
    per_failure = c.detect_s + c.recover_s + lost_d
    tau_m = None
    if memory and c.snapshot_stall_s is not None:
        # two tiers, each interval optimal for the failures it serves: snapshots for the fraction
        # p whose replica survived, durable checkpoints only for the rest
        p = c.snapshot_survives
        tau_m = interval(c.snapshot_stall_s, mttf_s / p, 0.0)
        tau_d = interval(c.ckpt_stall_s, mttf_s / (1 - p), c.ckpt_lag_s)
        lost_d = tau_d / 2 + c.ckpt_lag_s
        overhead = c.ckpt_stall_s / tau_d + c.snapshot_stall_s / tau_m
        per_failure = c.detect_s + p * (c.snapshot_recover_s + tau_m / 2) + (1 - p) * (c.recover_s + lost_d)
    value = max(0.0, 1 - overhead - per_failure / mttf_s)
    return {"ettr": value, "tau_s": tau_d, "tau_snapshot_s": tau_m, "checkpoint_overhead": overhead,
            "failure_cost_s": per_failure, "mttf_h": mttf_s / HOUR}


# --- inputs: measured here, and at scale ------------------------------------------------------------

# Medians of the 2-rank demo-GPT run recorded in docs/BENCHMARKS.md (bench/goodput.py --minutes 4,
# ours, 4 faults: detection 0.17-6.6 s, recovery after detection 9.6-22 s); --bench replaces them
# with another run's. At scale only detection and recovery are kept (the stall and the lag follow
# the state size below).
MEASURED = Costs(detect_s=1.39, recover_s=12.7, ckpt_stall_s=0.005, ckpt_lag_s=0.17, snapshot_stall_s=0.0058)

# At scale the stall and the upload grow with the state per GPU; recovery with the group.
STATE_PER_GPU_GB = 4.0  # Llama 3's checkpoints: 1 MB to 4 GB per GPU (sec. 3.3.4)
HOST_COPY_GBPS = 10.0  # device -> pinned host memory per GPU (PCIe Gen4 x16 moves ~25 GB/s)
STORAGE_GBPS = 2000.0  # Llama 3's Tectonic: 2 TB/s sustained for 16,384 GPUs (7 TB/s peak)
STORAGE_GPUS = 16384  # ... so by default storage grows with the job: 2 TB/s per 16,384 GPUs


@dataclass(frozen=True)
class Scenario:
    recover_s: float | None  # recovery besides detection and loading the state; None: the bench's
    fixed_storage: bool = False  # storage stays at 2 TB/s however large the job


SCENARIOS = {
    "ours, measured recovery": Scenario(None),
    "ours, measured recovery, storage fixed at 2 TB/s": Scenario(None, fixed_storage=True),
    "recovery 60 s": Scenario(60.0),
    "recovery 10 min": Scenario(600.0),
    "recovery 30 min": Scenario(1800.0),  # "if it takes you 30 minutes to resume, you're wasting someone's salary"
}


def at_scale(measured: Costs, gpus: int, sc: Scenario) -> Costs:
    """The measured costs with a real model's state: the stall is a copy to host memory; the lag
    is the job's whole checkpoint through shared storage, and a durable restore reads it back the
    same way; a snapshot restores from a peer's memory (a host-memory copy)."""
    stall = STATE_PER_GPU_GB / HOST_COPY_GBPS
    storage = STORAGE_GBPS * (1 if sc.fixed_storage else gpus / STORAGE_GPUS)
    through_storage = STATE_PER_GPU_GB * gpus / storage
    recover = measured.recover_s if sc.recover_s is None else sc.recover_s
    return replace(measured, recover_s=recover + through_storage, ckpt_stall_s=stall, ckpt_lag_s=through_storage,
                   snapshot_stall_s=stall, snapshot_recover_s=recover + stall)


def from_bench(path: Path, system: str = "ours") -> Costs:
    """The medians of one of our systems' runs in bench/goodput.py's output (the last line of `path`)."""
    report = json.loads(path.read_text().strip().splitlines()[-1])
    if system not in report["systems"]:
        sys.exit(f"{path}: no system {system!r} (it has {', '.join(report['systems'])})")
    ours = report["systems"][system]
    faults = [f for f in ours.get("faults", []) if f.get("recovered") and f.get("phases")]
    if not faults:
        sys.exit(f"{path}: no recovered fault with phases in systems.{system}.faults")
    detect = statistics.median(f["phases"]["detection"] for f in faults if f["phases"].get("detection") is not None)
    recover = statistics.median(f["recovery_s"] - (f["phases"].get("detection") or 0) for f in faults)
    snap = ours if "snapshot_blocked_s_median" in ours else report["systems"].get("ours_memory", {})
    return Costs(detect_s=detect, recover_s=recover, ckpt_stall_s=ours.get("blocked_s_median", MEASURED.ckpt_stall_s),
                 ckpt_lag_s=ours.get("upload_s_median", MEASURED.ckpt_lag_s),
                 snapshot_stall_s=snap.get("snapshot_blocked_s_median"))


# --- the table and the plot -------------------------------------------------------------------------


def table(measured: Costs) -> list[dict]:
    rows = []
    for gpus in (1024, 16384, 100_000):
        m = mttf(gpus)
        for name, sc in SCENARIOS.items():
            c = at_scale(measured, gpus, sc)
            row = {"gpus": gpus, "scenario": name, **ettr(c, m)}
            row["ettr_with_snapshots"] = ettr(c, m, memory=True)["ettr"]
            rows.append(row)
    return rows


def plot(measured: Costs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gpus = np.geomspace(512, 131072, 120)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = ["#1b7837", "#1b7837", "#2166ac", "#d6604d", "#762a83"]
    for (name, sc), color in zip(SCENARIOS.items(), colors, strict=True):
        y = [ettr(at_scale(measured, int(n), sc), mttf(n))["ettr"] for n in gpus]
        ax.plot(gpus, y, color=color, linestyle=":" if sc.fixed_storage else "-", label=f"{name}, durable checkpoints")
        if not sc.fixed_storage and (sc.recover_s is None or sc.recover_s <= 60):
            ys = [ettr(at_scale(measured, int(n), sc), mttf(n), memory=True)["ettr"] for n in gpus]
            ax.plot(gpus, ys, color=color, linestyle="--", label=f"{name}, + in-memory snapshots")
    ours = SCENARIOS["ours, measured recovery"]
    band = [[ettr(at_scale(measured, int(n), ours), mttf(n, a))["ettr"] for n in gpus] for a in ("llama3", "meta1k")]
    ax.fill_between(gpus, band[1], band[0], color=colors[0], alpha=0.12,
                    label="ours, measured recovery: MTTF from Llama 3 (top) to Meta 1k x 1/N (bottom)")
    ax.scatter([LLAMA3["gpus"]], [LLAMA3["ettr"]], marker="v", color="black", zorder=5,
               label="Llama 3 405B: >90% (16,384 GPUs)")
    ax.scatter([BYTEROBUST["gpus"]], [BYTEROBUST["ettr"]], marker="s", color="black", zorder=5,
               label="ByteRobust: 97% (9,600 GPUs)")
    for n in (1024, 16384, 100_000):
        ax.axvline(n, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("GPUs in the job")
    ax.set_ylabel("effective training time ratio")
    ax.set_title("ETTR = 1 - stall/interval - (detect + recover + lost work) / MTTF")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, help="a file whose last line is bench/goodput.py's JSON")
    p.add_argument("--system", default="ours", help="which of our systems in --bench (e.g. ours_standby)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "scale_goodput.png")
    args = p.parse_args(argv)
    if args.bench is not None and not args.bench.is_file():
        sys.exit(f"goodput_model: --bench {args.bench}: no such file (expected bench/goodput.py's output)")
    measured = from_bench(args.bench, args.system) if args.bench else MEASURED
    rows = table(measured)
    plot(measured, args.out)
    print("| GPUs | MTTF | scenario | interval | checkpoint overhead | cost per failure | ETTR | with snapshots |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['gpus']:,} | {r['mttf_h']:.2f} h | {r['scenario']} | {r['tau_s']:.0f} s | "
              f"{r['checkpoint_overhead']:.1%} | {r['failure_cost_s']:.0f} s | {r['ettr']:.1%} | "
              f"{r['ettr_with_snapshots']:.1%} |")
    print(json.dumps({"measured": asdict(measured), "rows": rows, "plot": str(args.out),
                      "assumptions": {"state_per_gpu_gb": STATE_PER_GPU_GB, "host_copy_gbps": HOST_COPY_GBPS,
                                      "storage_gbps": STORAGE_GBPS, "storage_per_gpus": STORAGE_GPUS},
                      "llama3": LLAMA3, "byterobust": BYTEROBUST}))


if __name__ == "__main__":
    main()
