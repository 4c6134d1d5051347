"""Silent data corruption between replicas: one changed weight on one rank is caught at the next
check, the rank named, corrupt checkpoints retired, and the run restarted from before it."""

from __future__ import annotations

import re

import pytest
import torch

from orchestrator import sdc
from tests.conftest import cli_json, run_cli, tiny_config


def test_the_checksum_sees_one_ulp_and_the_minority_is_named():
    a = [torch.randn(64, 64), torch.randn(64)]
    b = [t.clone() for t in a]
    assert sdc.checksum(a) == sdc.checksum(b) and sdc.checksum(a) != 0
    b[0].view(-1)[17] = torch.nextafter(b[0].view(-1)[17], torch.tensor(float("inf")))
    assert sdc.checksum(a) != sdc.checksum(b)
    assert sdc.minority([5, 5, 7, 5]) == [2]
    assert sdc.minority([5, 7]) == [0, 1]  # two replicas: no majority, both are suspects
    assert sdc.minority([5, 5, 7, 7]) == [0, 1, 2, 3]


def test_optimizer_state_counts_too():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    before = sdc.checksum(sdc.state_tensors(model, opt))
    next(iter(opt.state.values()))["exp_avg"].view(-1)[0] += 1e-7
    assert sdc.checksum(sdc.state_tensors(model, opt)) != before


@pytest.mark.ray
def test_a_corrupted_rank_is_caught_named_and_the_run_restarts_before_it(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, scaling={"num_workers": 3}, data={"global_batch_size": 12},
                      train={"max_steps": 24, "eval_every": 0}, checkpoint={"every_steps": 4},
                      health={"sdc_check_every": 10}, fault_tolerance={"max_restarts": 2, "backoff_s": 0.1},
                      model={"factory": "tests.user_models:corrupting_gpt",
                             "kwargs": {"corrupt_rank": 2, "corrupt_call": 6, "once_path": str(tmp_path / "once")}})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "silent data corruption: replicas disagree after step 10; rank(s) 2" in proc.stdout
    # 4 was committed before the check failed; 8 too unless its upload was still running when the group stopped
    assert re.search(r"checkpoints of step\(s\) 4(, 8)? retired: written after the last good replica check",
                     proc.stdout), proc.stdout
    run_id = cli_json("runs", home=home)[-1]["id"]
    show = cli_json("show", run_id, home=home)
    (event,) = [e for e in show["events"] if e["kind"] == "sdc"]
    assert event["rank"] == 2 and event["data"]["suspects"] == [2] and event["data"]["last_good"] == 0
    attempts = show["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "completed"] and attempts[0]["cause"] == "sdc"
    assert attempts[1]["resumed_from_step"] is None  # no checkpoint from before the corruption: from the start
    final = {c["step"]: c["status"] for c in cli_json("checkpoints", run_id, home=home)["checkpoints"]}
    assert final[24] == "committed"  # (4 and 8 were written again, from good state, after the restart)
