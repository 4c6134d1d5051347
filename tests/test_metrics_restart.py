"""A metrics actor that Ray restarts during a later attempt keeps storing that attempt's points.

Ray restarts the actor with its constructor arguments (attempt 0); the driver told the old
instance the attempt with `set_attempt`, which the new instance never hears.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from actors.metric_sender import MetricSender
from actors.metrics_actor import MetricsActor
from orchestrator.anomaly import AnomalyDetector
from orchestrator.store import Store
from tests.conftest import launch_in_background, tiny_config

pytestmark = pytest.mark.ray


def log_steps(sender: MetricSender, steps, attempt: int, *, kill_at: int | None = None, actor=None) -> None:
    import ray

    for step in steps:
        sender.log({"train/loss": 10.0 * attempt + step / 100, "train/lr": 0.1}, step=step)
        sender.flush()  # one batch per step: sequence numbers climb as a real run's do
        if step == kill_at:
            ray.kill(actor, no_restart=False)  # Ray restarts it; the sender re-sends what was not acknowledged


def test_points_of_attempt_1_survive_a_metrics_actor_restart(tmp_path, ray_address):
    import ray

    store = Store(tmp_path)
    store.create_run(run_id="run", name="n", config={}, git_commit=None, host="h", command="c", world_size=1)
    # as the driver does: created once per run, without the attempt
    actor = ray.remote(MetricsActor).options(max_restarts=-1, num_cpus=0).remote("run", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    store.start_attempt("run", 0, resumed_from_step=None)
    ray.get(actor.set_attempt.remote(0), timeout=120)
    first = MetricSender(actor, rank=0, send_timeout_s=60, background=False)
    log_steps(first, range(0, 30), attempt=0)
    first.close(attempts=10, backoff_s=0.2)

    # attempt 1 resumes from step 20 with new workers, whose senders count from 1 again
    store.start_attempt("run", 1, resumed_from_step=20)
    ray.get(actor.set_attempt.remote(1), timeout=120)
    second = MetricSender(actor, rank=0, send_timeout_s=60, background=False)
    log_steps(second, range(20, 40), attempt=1, kill_at=24, actor=actor)
    second.close(attempts=10, backoff_s=0.5)

    assert second.dropped_points == 0 and second.sent_points == 20 * 2
    pts = store.series("run", "train/loss", rank=0)
    assert [p["step"] for p in pts] == list(range(40))  # every step, each once
    assert [p["value"] for p in pts] == [s / 100 for s in range(20)] + [10 + s / 100 for s in range(20, 40)]
    by_attempt = {attempt: n for _, _, attempt, n in store.points.find("run", "train/loss")}
    assert by_attempt == {0: 30, 1: 20}  # attempt 1's points are stored as attempt 1, none twice
    ray.kill(actor, no_restart=True)


def wait_until(what: str, check, deadline: float):
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def series_of_attempt(store: Store, run_id: str, key: str, rank: int, attempt: int) -> int:
    return sum(n for _, r, a, n in store.points.find(run_id, key) if (r, a) == (rank, attempt))


def committed(store: Store, run_id: str) -> list[int]:
    records = store.checkpoint_records()
    try:
        return [c["step"] for c in records.list(run_id) if c["status"] == "committed"]
    finally:
        records.close()


def test_a_real_run_keeps_every_point_when_its_metrics_actor_dies_in_attempt_1(tmp_path, home, tiny_data,
                                                                              ray_address):
    import ray

    steps = 40
    released = tmp_path / "released"
    # paced (0.2 s a step) so attempt 1 still has steps to log once the metrics actor is back; at
    # full speed once the restarted actor stores them
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": steps, "eval_every": 0},
                      checkpoint={"every_steps": 5}, fault_tolerance={"max_restarts": 3, "backoff_s": 0.2},
                      model={"factory": "tests.user_models:slow_gpt",
                             "kwargs": {"pause_s": 0.2, "release_path": str(released)}})
    proc = launch_in_background(cfg, home=home, address=ray_address)
    try:
        deadline = time.monotonic() + 600
        wait_until("the store", (home / "store.db").exists, deadline)
        store = Store(home, create=False)
        run_id = wait_until("the run", lambda: [r["id"] for r in store.runs()], deadline)[0]
        wait_until("step 8", lambda: series_of_attempt(store, run_id, "train/loss", 0, 0) > 8, deadline)
        wait_until("a committed checkpoint", lambda: committed(store, run_id), deadline)  # so attempt 1 resumes
        victim = store.run(run_id)["meta"]["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)  # a worker of our test cluster: attempt 1 follows
        wait_until("attempt 1 logging", lambda: series_of_attempt(store, run_id, "train/loss", 0, 1) >= 2, deadline)
        actor = ray.get_actor(f"tiny:{run_id}:metrics", namespace="orchestrator")
        ray.kill(actor, no_restart=False)  # Ray restarts it with its constructor arguments
        before_restart = series_of_attempt(store, run_id, "train/loss", 0, 1)
        wait_until("points through the restarted actor",
                   lambda: series_of_attempt(store, run_id, "train/loss", 0, 1) > before_restart or proc.poll() is not None,
                   deadline)
        released.touch()
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    attempts = store.attempts(run_id)
    assert len(attempts) == 2, attempts
    resumed = attempts[1]["resumed_from_step"]
    assert before_restart < steps - resumed  # part of attempt 1 came through the restarted actor
    for rank in (0, 1):
        assert [p["step"] for p in store.series(run_id, "train/loss", rank=rank)] == list(range(steps))
        assert series_of_attempt(store, run_id, "train/loss", rank, 1) == steps - resumed  # each once
