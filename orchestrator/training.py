"""A rank's process, set up for training: its priority, torch's threads, deterministic
algorithms (rendezvous.join calls setup_torch).

The built-in GPT loop itself is a training function on ctx, orchestrator/gpt_function.py
(train_gpt), run by entrypoints.run_gpt.
"""

from __future__ import annotations

import os
import sys

import torch

from orchestrator.config import Config
from orchestrator.priority import normal_priority


def setup_torch(cfg: Config, rank: int) -> None:
    normal_priority()  # first: the threads torch and gloo start from here on inherit it
    torch.set_num_threads(cfg.scaling.torch_threads)
    if cfg.train.deterministic:
        use_deterministic_algorithms(compiling=cfg.train.compile)


def use_deterministic_algorithms(*, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms(True) without its import of torch._inductor, which costs
    seconds on every worker start (and so on every restart), unless the model will be compiled:
    then inductor is told too."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if compiling:
        torch.use_deterministic_algorithms(True)
        return
    torch._C._set_deterministic_algorithms(True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True
