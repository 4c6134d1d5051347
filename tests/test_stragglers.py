"""Straggler detection (orchestrator/hang/stragglers.py) on seeded synthetic compute times, and
its alerts through the AnomalyDetector. Pure numpy: no Ray, no timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.anomaly import AnomalyDetector
from orchestrator.hang.stragglers import StragglerConfig, StragglerDetector


def times(ranks: int, steps: int, seed: int, *, jitter: float = 0.10, slow=()) -> np.ndarray:
    """times[step, rank]: 100 ms with lognormal jitter; slow: (rank, factor, first, end) spells."""
    rng = np.random.default_rng(seed)
    t = 0.1 * np.exp(rng.normal(0.0, jitter, (steps, ranks)))
    for rank, factor, first, end in slow:
        t[first:end, rank] *= factor
    return t


def run(det: StragglerDetector, t: np.ndarray, batch: int = 25, first: int = 0) -> list:
    found = []
    for s in range(0, len(t), batch):
        found += det.observe_steps(np.arange(first + s, first + min(len(t), s + batch)), t[s:s + batch])
    return found


def test_a_rank_115x_slower_is_caught_within_30_steps_and_named_once():
    t = times(8, 800, seed=3, slow=[(5, 1.15, 400, 800)])
    found = run(StragglerDetector(), t)
    assert [f.rank for f in found] == [5]
    assert 400 <= found[0].step < 430
    assert found[0].onset_step >= 380  # the evidence starts near the onset, not at the first step
    assert 1.05 < found[0].evidence["slowdown"] < 1.3


@pytest.mark.parametrize("seed", range(4))
def test_no_alert_on_10000_healthy_steps(seed):
    det = StragglerDetector()
    assert run(det, times(8, 10_000, seed=100 + seed), batch=200) == []
    assert 0.09 < det.sigma < 0.13  # the noise scale the data shows: 10% each, and the peers' median's share


def test_two_healthy_ranks_raise_nothing_and_a_slow_one_is_named():
    assert run(StragglerDetector(), times(2, 10_000, seed=7), batch=200) == []
    found = run(StragglerDetector(), times(2, 600, seed=8, slow=[(0, 1.3, 300, 600)]))
    assert [f.rank for f in found] == [0] and 300 <= found[0].step < 340  # never the faster one


def test_a_few_slow_steps_are_not_a_straggler():
    """GC pauses and checkpoint writes: 3x to 10x slower for 1 to 7 steps, on several ranks."""
    spells = [(1, 3.0, 100, 105), (2, 10.0, 300, 303), (1, 4.0, 500, 507), (6, 2.0, 700, 707), (3, 50.0, 900, 901)]
    assert run(StragglerDetector(), times(8, 1000, seed=11, slow=spells)) == []


def test_verdicts_do_not_depend_on_how_the_batches_arrive():
    t = times(4, 600, seed=5, slow=[(2, 1.3, 250, 600)])
    one = run(StragglerDetector(), t, batch=1)
    det = StragglerDetector()  # ranks send unequal batches at their own pace, out of turn
    rng = np.random.default_rng(0)
    sent = [0] * 4
    while min(sent) < len(t):
        r = int(rng.integers(0, 4))
        n = int(rng.integers(1, 60))
        det.observe(r, np.arange(sent[r], min(len(t), sent[r] + n)), t[sent[r]:sent[r] + n, r])
        sent[r] = min(len(t), sent[r] + n)
    assert [(f.rank, f.step) for f in one] == [(r, f.step) for r, f in det.flagged.items()] == [(2, one[0].step)]


def test_one_alert_per_slow_spell_and_a_new_one_after_recovery():
    t = times(8, 1500, seed=9, slow=[(4, 1.5, 200, 500), (4, 1.5, 1000, 1500)])
    det = StragglerDetector()
    found = run(det, t)
    assert [(f.rank, f.step // 100) for f in found] == [(4, 2), (4, 10)]


def test_1024_ranks_one_straggler_named():
    t = times(1024, 300, seed=2, slow=[(777, 1.3, 150, 300)])
    found = run(StragglerDetector(), t, batch=50)
    assert [f.rank for f in found] == [777] and found[0].step < 180 and found[0].evidence["ranks_compared"] == 1024


def test_a_rank_that_stops_reporting_does_not_stop_the_others_being_judged():
    cfg = StragglerConfig(buffer_steps=128)
    t = times(4, 800, seed=4, slow=[(1, 1.5, 400, 800)])
    det = StragglerDetector(cfg)
    found = det.observe_steps(np.arange(100), t[:100])
    for s in range(100, 800, 10):  # rank 3 is silent from step 100 (hung, or its metrics lost)
        for r in range(3):
            found += det.observe(r, np.arange(s, s + 10), t[s:s + 10, r])
    assert [f.rank for f in found] == [1] and found[0].evidence["ranks_compared"] == 4


def cols(steps, values):
    return {"health/compute_s": (np.asarray(steps), np.asarray(values, dtype=float))}


def feed(det: AnomalyDetector, t: np.ndarray, first: int = 0, batch: int = 20) -> list:
    alerts = []
    for s in range(0, len(t), batch):
        for r in range(t.shape[1]):
            alerts += det.observe(r, cols(np.arange(first + s, first + min(len(t), s + batch)), t[s:s + batch, r]))
    return alerts


def test_the_alert_names_the_rank_and_carries_the_evidence():
    det = AnomalyDetector()
    alerts = feed(det, times(8, 600, seed=3, slow=[(6, 1.5, 300, 600)]))
    assert [(a.kind, a.rank, a.severity) for a in alerts] == [("straggler", 6, "warning")]
    a = alerts[0]
    assert a.message.startswith("rank 6 computes at 0.6")  # the prefix the CLI's ALERT line and tests read
    d = json.loads(json.dumps(a.data))  # stored as JSON
    assert d["ranks"] == [6] and d["ranks_compared"] == 8 and d["onset_step"] >= 290
    assert d["rank_compute_s"] / d["typical_compute_s"] == pytest.approx(d["slowdown"], rel=0.1)
    assert 1.35 < d["slowdown"] < 1.8 and d["score"] == pytest.approx(1 / d["slowdown"])
    assert d["cusum"] >= d["threshold"] and d["evidence_steps"] >= det.t.straggler.min_steps
    assert 0.09 < d["noise"] < 0.13
    assert det.scores[6][1] < 0.75 < det.scores[0][1]  # the per-rank score the metrics actor stores


def test_a_restart_starts_afresh_and_the_straggler_is_reported_again():
    det = AnomalyDetector()
    slow = [(1, 1.5, 0, 400)]
    assert [a.rank for a in feed(det, times(4, 400, seed=1, slow=slow))] == [1]
    det.new_group()
    assert det.scores == {} and det.stragglers.flagged == {}
    again = feed(det, times(4, 400, seed=2, slow=slow), first=380)  # resumed from a checkpoint before the alert
    assert [a.rank for a in again] == [1] and again[0].step > 380


def test_an_alert_lost_with_its_batch_is_raised_again():
    """The metrics actor puts last_alert back when the batch's transaction fails: the next batch
    must raise the alert again (and only once)."""
    det = AnomalyDetector()
    t = times(4, 400, seed=6, slow=[(3, 1.5, 100, 400)])
    alerts, lost = [], False
    for s in range(0, 400, 10):
        for r in range(4):
            batch = cols(np.arange(s, s + 10), t[s:s + 10, r])
            before = dict(det.last_alert)
            new = det.observe(r, batch)
            if new and not lost:  # the store refused this batch: nothing of it was recorded; it is re-sent
                det.last_alert, lost = before, True
                new = det.observe(r, batch)
            alerts += new
    assert lost and [a.rank for a in alerts] == [3]
