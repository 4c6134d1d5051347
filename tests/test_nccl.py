"""NCCL's failures named from torch's own message texts, its options for diagnosis, and the
timeout order that lets the watchdog diagnose a hang before torch aborts it (no GPU needed)."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from orchestrator.config import STALL_DIAGNOSIS_S, config_from_dict
from orchestrator.hang import nccl

# texts as torch and NCCL print them (ProcessGroupNCCL.cpp, nccl.h's ncclResult_t strings)
MESSAGES = {
    "nccl_timeout": "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, "
                    "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600045 milliseconds before timing out.",
    "nccl_remote": "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, remote process exited or "
                   "there was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a "
                   "network error or a remote process exiting prematurely.",
    "nccl_system": "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled system error "
                   "(run with NCCL_DEBUG=INFO for details), NCCL version 2.19.3\nncclSystemError: System call (e.g. "
                   "socket, malloc) or external library call failed or device error.",
    "cuda_error": "RuntimeError: CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                  "asynchronously reported at some other API call",
    "gpu_hardware": "RuntimeError: CUDA error: uncorrectable ECC error encountered (NVRM: Xid 48)",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_each_failure_is_named_from_its_message(kind):
    got = nccl.classify(MESSAGES[kind])
    assert got is not None and got[0] == kind and got[1]


def test_other_errors_are_not_nccl():
    for text in ("ValueError: bad batch", "RuntimeError: Timed out waiting 60000ms for recv operation (gloo)", ""):
        assert nccl.classify(text) is None


def test_diagnosis_options_keep_the_recorder_and_outlast_the_watchdog():
    env = nccl.diagnosis_env(trace_entries=2000, dump_dir="/runs/r1/diagnostics", stall_budget_s=1000)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/runs/r1/diagnostics/nccl_trace_rank_"
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) >= 1000 and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    off = nccl.diagnosis_env(trace_entries=0, dump_dir=None, stall_budget_s=10)
    assert off["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in off


def test_torch_may_not_abort_a_hang_before_the_watchdog_diagnoses_it():
    base = {"data": {"uri": "x"}}
    cfg = config_from_dict(base)  # the defaults are in order
    assert cfg.distributed.timeout_s >= max(cfg.hang.timeout_s, cfg.hang.first_step_timeout_s) + STALL_DIAGNOSIS_S
    with pytest.raises(ConfigError, match=r"distributed.timeout_s=300 would let torch abort .*"
                                          r"hang.first_step_timeout_s=300 .* expected at least 360"):
        config_from_dict({**base, "distributed": {"timeout_s": 300}})  # noqa: B018
    config_from_dict({**base, "distributed": {"timeout_s": 300}, "hang": {"enabled": False}})  # no watchdog: no rule
    config_from_dict({**base, "distributed": {"timeout_s": 130}, "hang": {"timeout_s": 30, "first_step_timeout_s": 60}})


# --- the GPU halves (@pytest.mark.gpu: skipped with the reason without CUDA; `make test-gpu`) -------


def _nccl_rank(rank: int, world: int, port: int, out_dir: str, what: str) -> None:
    """One rank of a real NCCL group (torch.multiprocessing.spawn calls it); its answer as JSON."""
    import json
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_NCCL_TRACE_BUFFER_SIZE="100")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        answer = {}
        if what == "flight_recorder":
            from orchestrator.hang.health import flight_recorder_dump

            t = torch.ones(4, device="cuda")
            for _ in range(3):
                dist.all_reduce(t)
            torch.cuda.synchronize()
            dump = json.loads(flight_recorder_dump() or "{}")
            answer = {"names": [e.get("profiling_name") for e in dump.get("entries", [])]}
        elif what == "sdc":
            from common.errors import SilentCorruption
            from orchestrator import sdc

            torch.manual_seed(0)
            model = torch.nn.Linear(8, 8).cuda()
            sdc.check(model, None, step=1, device=torch.device("cuda", rank))  # identical replicas: silent
            if rank == 1:
                with torch.no_grad():
                    model.weight[0, 0] += 1e-3  # one weight on one rank, outside autograd
            try:
                sdc.check(model, None, step=2, device=torch.device("cuda", rank))
                answer = {"raised": False}
            except SilentCorruption as e:
                answer = {"raised": True, "step": e.step, "suspects": e.suspects}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(answer, f)
    finally:
        dist.destroy_process_group()


def _on_two_gpus(tmp_path, what: str) -> list[dict]:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_rank, args=(2, port, str(tmp_path), what), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.gpu(count=2)
def test_on_nccl_the_flight_recorder_read_is_nccls_own(tmp_path):
    """flight_recorder_dump reads NCCL's recorder when the backend is NCCL: the all-reduces are in it."""
    for answer in _on_two_gpus(tmp_path, "flight_recorder"):
        names = answer["names"]
        assert names and sum("all_reduce" in (n or "") for n in names) >= 3, names


@pytest.mark.gpu(count=2)
def test_on_cuda_replicas_the_replica_check_catches_one_changed_weight(tmp_path):
    answers = _on_two_gpus(tmp_path, "sdc")
    assert answers and all(a["raised"] and a["step"] == 2 for a in answers), answers
    assert all(a["suspects"] == [0, 1] for a in answers)  # two ranks: no majority, both are suspects


@pytest.mark.gpu(count=1)
def test_a_collective_on_cuda_counts_as_done_when_the_device_is_done():
    """The host leaves `counted` at once with work queued on the stream; the heartbeat counts the
    collective done only when a CUDA event recorded after it has completed."""
    import torch

    from orchestrator.context import counted
    from orchestrator.hang.health import Health

    health = Health(0)
    with torch.cuda.device(0), counted(health, True, torch.device("cuda", 0)):
        torch.cuda._sleep(2_000_000_000)  # about a second of queued GPU time (cycles), as an all-reduce waiting
    queued = health.snapshot()
    torch.cuda.synchronize()
    assert (queued["coll_entered"], queued["coll_completed"]) == (1, 0)
    assert health.snapshot()["coll_completed"] == 1
