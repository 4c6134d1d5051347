"""Straggler detection on synthetic compute-time streams: ours (orchestrator/hang/stragglers.py)
against NVIDIA Resiliency Extension's straggler scoring, on the same streams, many seeds.

Streams: times[step, rank] = 1 s x jitter, every rank-step independent: lognormal (exp of
N(0, --jitter)) or gaussian (1 + --jitter x N(0, 1), floored at 0.05). Per world size (--ranks):
  healthy   --streams streams of --steps steps, all ranks alike: any alert is a false one.
  tails     the same, plus heavy tails: each rank-step is, with probability --tail-p, slower by a
            factor drawn uniformly from 1.5-5 (GC pauses, page faults, a checkpoint write).
  slow F    one rank (chosen at random) becomes F times slower (--slowdowns) at a random onset
            (uniform in [300, 1300)) and stays so for --horizon steps, where the stream ends.
Figures:
  false alarms: the fraction of healthy streams with any alert at all (the stricter reading of
    "FPR over 10,000 steps": one alert on any rank anywhere in a stream counts the stream), with
    its one-sided 95% upper bound (Clopper-Pearson), and alerts per rank-step.
  delay: steps from the onset to the first alert naming the slow rank (the onset step counts as
    1): median, p95, max; missed = no such alert within the horizon; wrong = alerts naming another
    rank, or the slow rank before its onset.

Ours: StragglerDetector with its defaults, fed in blocks of 100 steps (as the metrics actor gets
each rank's batches; the verdicts do not depend on the batching, tests/test_stragglers.py).

NVRx: each rank's score per report = (the lowest per-rank median section time over the report
interval, across ranks) / (this rank's median); a rank scoring below the threshold is a
straggler. With the `nvidia-resiliency-ext` package installed its own code computes the scores
(`ReportGenerator._compute_sections_perf_scores`) and flags the ranks (`Report.identify_stragglers`);
the per-rank median is torch.median as in `Detector._get_section_summaries` (checked equal to it
on the first stream of each world size), and the cross-rank MIN (an all-reduce there) is taken
here. Without the package, the same published algorithm is reimplemented here, and the JSON says
so. NVRx measures in seconds; its report interval in steps = interval_s / step time (1 s here).
Arms: 300 s / 0.7 (as issue 13 describes NVRx's use), 60 s / 0.75 (the library's own defaults
in 0.4.1: Detector.initialize and identify_stragglers), and 30 steps / 0.7 (our 30-step budget).

Progress on stderr; one JSON object on the last stdout line (`headline`: per world size and
side, the healthy-stream false-alarm rate and, per slowdown, [median delay, p95, missed]).
Stream counts are per world size (fewer at 1,024 ranks, where one 10,000-step stream takes seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import git_state, machine  # noqa: E402

from orchestrator.anomaly import AnomalyDetector  # noqa: E402
from orchestrator.hang.stragglers import StragglerDetector  # noqa: E402

STEP_S = 1.0
ONSET = (300, 1300)
NVRX_ARMS = {"nvrx_300s_0.7": (300.0, 0.7), "nvrx_60s_0.75": (60.0, 0.75), "nvrx_30steps_0.7": (30 * STEP_S, 0.7)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stream(rng, ranks: int, steps: int, args, tail_p: float = 0.0) -> np.ndarray:
    if args.noise == "lognormal":
        t = np.exp(rng.normal(0.0, args.jitter, (steps, ranks)))
    else:
        t = np.maximum(0.05, 1.0 + args.jitter * rng.normal(size=(steps, ranks)))
    if tail_p:
        spike = rng.random((steps, ranks)) < tail_p
        t[spike] *= rng.uniform(1.5, 5.0, int(spike.sum()))
    return STEP_S * t


def ours(t: np.ndarray, block: int = 100) -> list[tuple[int, int]]:
    det = StragglerDetector()
    found = []
    for s in range(0, len(t), block):
        found += [(f.rank, f.step) for f in det.observe_steps(np.arange(s, min(len(t), s + block)), t[s:s + block])]
    return found


class NVRx:
    """NVRx's relative section scoring: the library's code when installed, else our reimplementation."""

    def __init__(self):
        try:
            from importlib.metadata import version

            from nvidia_resiliency_ext.straggler.reporting import Report, ReportGenerator
            from nvidia_resiliency_ext.straggler.statistics import Statistic
            from nvidia_resiliency_ext.straggler.straggler import CustomSection, Detector
        except ImportError as e:
            self.lib = None
            self.source = f"reimplementation of NVRx's published algorithm (nvidia-resiliency-ext not importable: {e})"
            return
        import torch

        self.torch, self.Report, self.Statistic, self.CustomSection, self.Detector = (
            torch, Report, Statistic, CustomSection, Detector)
        # no process group: a world of one; the cross-rank MIN reference is passed in
        self.lib = ReportGenerator(scores_to_compute=["relative_perf_scores"], gather_on_rank0=True)
        self.source = f"nvidia-resiliency-ext {version('nvidia-resiliency-ext')} (its scoring and flagging code)"
        self.checked: dict[int, bool] = {}

    def medians(self, window: np.ndarray) -> np.ndarray:
        """Per rank: the median section time of a report window (rows = steps)."""
        if self.lib is None:
            return np.sort(window, axis=0)[(len(window) - 1) // 2]  # torch.median's lower middle value
        med = self.torch.median(self.torch.from_numpy(np.ascontiguousarray(window.T)), dim=1).values.numpy()
        n = window.shape[1]
        if n not in self.checked:  # the library's own summary, rank by rank, once per world size
            self.Detector.custom_sections = {str(r): self.CustomSection(name=str(r), location="bench") for r in range(n)}
            for r in range(n):
                self.Detector.custom_sections[str(r)].cpu_elapsed_times.extend(window[:, r].tolist())
            summ = self.Detector._get_section_summaries()
            del self.Detector.custom_sections
            self.checked[n] = all(summ[str(r)][self.Statistic.MED] == med[r] for r in range(n))
        return med

    def flag(self, med: np.ndarray, threshold: float) -> list[int]:
        ref = float(med.min())  # the all-reduce MIN of every rank's median
        if self.lib is None:
            return [int(r) for r in np.flatnonzero(ref / med < threshold)]
        n = len(med)
        scores = self.lib._compute_sections_perf_scores({str(r): {self.Statistic.MED: float(m)} for r, m in enumerate(med)},
                                                         reference={str(r): ref for r in range(n)})
        report = self.Report(gpu_relative_perf_scores={}, section_relative_perf_scores={"step": {r: scores[str(r)] for r in range(n)}},
                             gpu_individual_perf_scores={}, section_individual_perf_scores={},
                             rank_to_node={r: "sim" for r in range(n)}, local_section_summaries={},
                             local_kernel_summaries={}, generate_report_elapsed_time=0.0, gather_on_rank0=True, rank=None)
        ids = report.identify_stragglers(gpu_rel_threshold=threshold, section_rel_threshold=threshold)
        return sorted(i.rank for i in ids["straggler_sections_relative"].get("step", ()))

    def run(self, t: np.ndarray, interval_s: float, threshold: float) -> list[tuple[int, int]]:
        every = max(1, int(interval_s / STEP_S))
        found = []
        for end in range(every, len(t) + 1, every):
            found += [(r, end - 1) for r in self.flag(self.medians(t[end - every:end]), threshold)]
        return found


def upper95(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen k times in n."""
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        lo, hi = (p, hi) if cdf > 0.05 else (lo, p)
    return hi


def per_size(value: str, sizes: list[int], name: str) -> list[int]:
    counts = [int(x) for x in value.split(",")]
    if len(counts) == 1:
        return counts * len(sizes)
    if len(counts) != len(sizes):
        raise SystemExit(f"--{name.replace('_', '-')}: {len(counts)} counts for {len(sizes)} world sizes (--ranks)")
    return counts


def healthy(ranks: int, count: int, seed0: int, args, arms, tail_p: float = 0.0) -> dict:
    hit = {a: 0 for a in arms}
    alerts = {a: 0 for a in arms}
    for i in range(count):
        t = stream(np.random.default_rng(seed0 + i), ranks, args.steps, args, tail_p)
        for a, fn in arms.items():
            found = fn(t)
            hit[a] += bool(found)
            alerts[a] += len(found)
    return {a: {"streams": count, "streams_with_false_alert": hit[a], "fpr_streams": hit[a] / count,
                "fpr_streams_upper95": round(upper95(hit[a], count), 4), "false_alerts": alerts[a],
                "alerts_per_rank_step": alerts[a] / (count * ranks * args.steps)} for a in arms}


def slow(ranks: int, factor: float, count: int, seed0: int, args, arms) -> dict:
    delays = {a: [] for a in arms}
    wrong = {a: 0 for a in arms}
    for i in range(count):
        rng = np.random.default_rng(seed0 + i)
        onset, rank = int(rng.integers(*ONSET)), int(rng.integers(0, ranks))
        t = stream(rng, ranks, onset + args.horizon, args)
        t[onset:, rank] *= factor
        for a, fn in arms.items():
            found = fn(t)
            right = [s for r, s in found if r == rank and s >= onset]
            wrong[a] += len(found) - len(right)
            delays[a].append(right[0] - onset + 1 if right else None)
    out = {}
    for a, d in delays.items():
        got = sorted(x for x in d if x is not None)
        out[a] = {"streams": count, "missed": len(d) - len(got), "wrong_alerts": wrong[a],
                  "delay_median": float(np.median(got)) if got else None,
                  "delay_p95": float(np.percentile(got, 95)) if got else None,
                  "delay_max": got[-1] if got else None,
                  "caught_within_30": sum(x <= 30 for x in got) / len(d)}
    return out


def cost(ranks: int, steps: int = 1000, batch: int = 100) -> dict:
    """The metrics actor's path: AnomalyDetector.observe, one rank's batch per call."""
    t = stream(np.random.default_rng(0), ranks, steps, argparse.Namespace(noise="lognormal", jitter=0.1))
    det = AnomalyDetector()
    calls = 0
    started = time.perf_counter()
    for s in range(0, steps, batch):
        for r in range(ranks):
            det.observe(r, {"health/compute_s": (np.arange(s, s + batch), t[s:s + batch, r])})
            calls += 1
    took = time.perf_counter() - started
    return {"ranks": ranks, "steps_per_call": batch, "us_per_call": round(took / calls * 1e6, 1),
            "us_per_rank_step": round(took / (ranks * steps) * 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,8,64,1024", help="world sizes, comma-separated")
    p.add_argument("--steps", type=int, default=10_000, help="steps per healthy stream")
    p.add_argument("--streams", default="1000,300,100,10",
                   help="healthy streams per world size (one number, or one per --ranks entry)")
    p.add_argument("--slow-streams", default="200,200,100,10", help="streams per slowdown factor and world size")
    p.add_argument("--tail-streams", default="200,100,50,5", help="heavy-tailed healthy streams per world size")
    p.add_argument("--slowdowns", default="1.15,1.3,1.5")
    p.add_argument("--horizon", type=int, default=700, help="steps after the onset (NVRx at 300 s needs 2 reports)")
    p.add_argument("--jitter", type=float, default=0.10)
    p.add_argument("--noise", choices=("lognormal", "gaussian"), default="lognormal")
    p.add_argument("--tail-p", type=float, default=0.005, help="heavy tails: chance a rank-step is 1.5-5x slower")
    p.add_argument("--no-nvrx", action="store_true")
    args = p.parse_args()
    started, load_start, git_start = time.time(), os.getloadavg(), git_state()
    nvrx = None if args.no_nvrx else NVRx()
    arms = {"ours": ours}
    if nvrx:
        arms |= {a: (lambda t, i=i, th=th: nvrx.run(t, i, th)) for a, (i, th) in NVRX_ARMS.items()}
    log(f"NVRx: {nvrx.source if nvrx else 'skipped'}")
    results = {}
    sizes = [int(x) for x in args.ranks.split(",")]
    counts = {k: per_size(getattr(args, k), sizes, k) for k in ("streams", "slow_streams", "tail_streams")}
    for i, ranks in enumerate(sizes):
        n = {k: c[i] for k, c in counts.items()}
        r = results[ranks] = {"healthy": healthy(ranks, n["streams"], 0, args, arms)}
        log(f"{ranks} ranks: healthy " + ", ".join(f"{a} {v['streams_with_false_alert']}/{v['streams']}"
                                                    for a, v in r["healthy"].items()))
        r["tails"] = healthy(ranks, n["tail_streams"], 10**6, args, arms, tail_p=args.tail_p)
        log(f"{ranks} ranks: heavy tails " + ", ".join(f"{a} {v['streams_with_false_alert']}/{v['streams']}"
                                                        for a, v in r["tails"].items()))
        for f in (float(x) for x in args.slowdowns.split(",")):
            r[f"slow_{f}"] = slow(ranks, f, n["slow_streams"], 2 * 10**6 + int(f * 1000) * 1000, args, arms)
            log(f"{ranks} ranks, {f}x: " + "; ".join(
                f"{a} median {v['delay_median']} p95 {v['delay_p95']} missed {v['missed']}/{v['streams']}"
                for a, v in r[f"slow_{f}"].items()))
    costs = [cost(8), cost(1024, steps=300)]
    log("cost per AnomalyDetector.observe call: " + ", ".join(f"{c['ranks']} ranks {c['us_per_call']} us" for c in costs))
    summary = {
        "bench": "stragglers",
        "streams": {"noise": args.noise, "jitter": args.jitter, "steps": args.steps, "tail_p": args.tail_p,
                    "onset": list(ONSET), "horizon": args.horizon, "step_s": STEP_S},
        "nvrx": {"source": nvrx.source, "arms": {a: {"interval_s": i, "threshold": th} for a, (i, th) in NVRX_ARMS.items()},
                 "median_checked_equal_to_library": getattr(nvrx, "checked", None)} if nvrx else None,
        "headline": {ranks: {a: {"fpr_streams": r["healthy"][a]["fpr_streams"],
                                 "fpr_streams_upper95": r["healthy"][a]["fpr_streams_upper95"],
                                 **{f"delay_{k[5:]}x": [r[k][a]["delay_median"], r[k][a]["delay_p95"], r[k][a]["missed"]]
                                    for k in r if k.startswith("slow_")}}
                             for a in ("ours", "nvrx_300s_0.7") if a in r["healthy"]}
                     for ranks, r in results.items()},
        "results": results,
        "cost": costs,
        "wall_s": round(time.time() - started, 1),
        "loadavg_start_end": [load_start[0], os.getloadavg()[0]],
        "git": {"start": git_start, "end": git_state()},
        "machine": machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
