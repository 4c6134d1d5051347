"""A non-finite loss: fail clearly, or roll back to the last checkpoint and skip the batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import cli_json, run_cli, tiny_config

pytestmark = pytest.mark.ray

BAD = 12  # the global batch that makes the loss NaN


def poison_for(data_uri: str) -> tuple[list[int], list[float]]:
    """The first tokens rank 0 sees in batch BAD (2 ranks, global batch 8), and the fingerprints of
    the batches a run that skips BAD trains on."""
    from dataloading.dataset import TokenDataset
    from dataloading.sampler import GlobalSampler, batch_fingerprint

    data = TokenDataset(data_uri, "train")
    sampler = GlobalSampler(len(data), 8, seed=1)
    first = data.batch(sampler.local_batch(BAD, 0, 2))[0, :16].tolist()
    used = [b for b in range(31) if b != BAD][:30]
    return first, [float(batch_fingerprint(sampler.global_batch(b))) for b in used]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_data, ray_address):
    """{"fail" | "rollback": (its launch, its store)}: the same poisoned run under each policy,
    side by side (2 workers each on the session cluster's 4 CPUs: a launch mostly waits)."""
    poison, _ = poison_for(tiny_data)
    policies = {"fail": {}, "rollback": {"checkpoint": {"every_steps": 5},
                                         "fault_tolerance": {"on_nonfinite": "rollback", "max_restarts": 2,
                                                             "backoff_s": 0.1}}}

    def launch(name: str):
        tmp = tmp_path_factory.mktemp(name)
        cfg = tiny_config(tmp, tiny_data, train={"max_steps": 30, "eval_every": 0},
                          model={"factory": "tests.user_models:poisoned_gpt", "kwargs": {"poison": poison}},
                          **policies[name])
        return run_cli("launch", str(cfg), "--address", ray_address, home=tmp / "home"), tmp / "home"

    with ThreadPoolExecutor(len(policies)) as pool:
        started = {name: pool.submit(launch, name) for name in policies}
        return {name: done.result() for name, done in started.items()}


def test_nonfinite_loss_fails_clearly(launched):
    proc, _ = launched["fail"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "NonFiniteLoss: train/loss is nan at step 12" in last, last
    assert "RESTART" not in proc.stdout  # fail means fail: no restart loop


def test_nonfinite_loss_rolls_back_and_skips_the_batch(launched, tiny_data):
    _, expected = poison_for(tiny_data)
    proc, home = launched["rollback"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping global batch 12 (non-finite loss)" in proc.stdout
    run_id = cli_json("runs", home=home)[-1]["id"]
    fps = cli_json("metrics", run_id, "--key", "data/batch_fingerprint", "--rank", "0", home=home)["points"]
    assert [p["value"] for p in fps] == expected  # batch 12 never trained on, everything after shifted by one
    losses = cli_json("metrics", run_id, "--key", "train/loss", "--rank", "0", home=home)["points"]
    assert [p["step"] for p in losses] == list(range(30))
    assert all(p["value"] == p["value"] for p in losses)  # no NaN left in the history
    from orchestrator.store import Store

    assert Store(home).attempts(run_id)[0]["cause"] == "non_finite_loss"
