"""NCCL, as torch drives it: the options that make its failures diagnosable, and its failures
named from their messages (the "NCCL timeout" users see is several different faults).

Set per rank before the process group is created, unless the user set them:
  TORCH_NCCL_TRACE_BUFFER_SIZE   NCCL's own Flight Recorder (last N collectives), read on a stall
  TORCH_NCCL_DUMP_ON_TIMEOUT     its dump when torch's watchdog times out, into the run's folder
  TORCH_NCCL_DEBUG_INFO_TEMP_FILE   where those dumps go (one file per rank)
  TORCH_NCCL_ASYNC_ERROR_HANDLING   3: tear the process down on an error (torch's default, explicit)
  TORCH_NCCL_ENABLE_MONITORING   abort a process whose NCCL watchdog itself hangs ...
  TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC   ... after this long (longer than our stall diagnosis)
  TORCH_NCCL_DESYNC_DEBUG        torch's own desync report on a timeout
"""

from __future__ import annotations

import re

# (kind, pattern, what it means); the first match wins, most specific first
PATTERNS = [
    ("gpu_hardware", r"\bXid\b|uncorrectable ECC|ECC error|GPU has fallen off the bus|NVML_ERROR_GPU_IS_LOST",
     "the GPU reported a hardware fault (ECC/Xid): replace or drain the node"),
    ("cuda_error", r"CUDA error|unhandled cuda error|cudaError|illegal memory access|CUBLAS_STATUS|CUDNN_STATUS",
     "a CUDA error on the rank's GPU"),
    ("nccl_timeout", r"Watchdog caught collective operation timeout|collective operation timeout|"
     r"ProcessGroupNCCL.*[Tt]imeout|NCCL.*timed? ?out",
     "a collective did not finish within distributed.timeout_s (a peer stalled or the network is down)"),
    ("nccl_remote", r"ncclRemoteError|remote process exited|Connection closed by remote peer|NET/IB.*error",
     "a peer rank or the network between nodes failed (ncclRemoteError)"),
    ("nccl_system", r"ncclSystemError|ncclInternalError|ncclUnhandledCudaError|NCCL error",
     "NCCL failed on this node (ncclSystemError: sockets, shared memory, drivers)"),
]
_COMPILED = [(kind, re.compile(p), why) for kind, p, why in PATTERNS]


def classify(text: str) -> tuple[str, str] | None:
    """(kind, what it means) for an NCCL/CUDA failure message, or None for anything else."""
    for kind, pattern, why in _COMPILED:
        if pattern.search(text or ""):
            return kind, why
    return None


def diagnosis_env(*, trace_entries: int, dump_dir: str | None, stall_budget_s: float) -> dict[str, str]:
    """The defaults above (the caller keeps the user's own settings)."""
    env = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(trace_entries),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1" if trace_entries else "0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(max(600, stall_budget_s))),
        "TORCH_NCCL_DESYNC_DEBUG": "1",
    }
    if dump_dir:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = f"{dump_dir.rstrip('/')}/nccl_trace_rank_"
    return env
