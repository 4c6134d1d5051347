"""What the silent-data-corruption check costs on the demo GPT: the checksum of weights and
AdamW state (the part that grows with the model), against a training step of the same model
on the same thread, in one process. The all-gather of one int64 per rank is not included.
JSON on the last line."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from orchestrator import sdc
from orchestrator.config import config_from_dict
from orchestrator.gpt import build_model
from orchestrator.gpt_function import loss_of, make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib is beside us
from benchlib import machine  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = config_from_dict(yaml.safe_load(open("configs/demo.yaml")))
    model = build_model(cfg.model, vocab_size=256, block_size=256)
    opt = make_optimizer(model, cfg)
    batch = torch.randint(0, 256, (cfg.data.global_batch_size // cfg.scaling.num_workers, 257))
    steps, sums = [], []
    for _ in range(30):
        t = time.perf_counter()
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        sdc.checksum(sdc.state_tensors(model, opt))
        sums.append(time.perf_counter() - t)
    step_s, check_s = statistics.median(steps[5:]), statistics.median(sums[5:])
    every = cfg.health.sdc_check_every
    print(json.dumps({"bench": "sdc_cost", "machine": machine(), "params": sum(p.numel() for p in model.parameters()),
                      "step_s_median": round(step_s, 4), "checksum_s_median": round(check_s, 5),
                      "checksum_per_step_ratio": round(check_s / step_s, 4), "sdc_check_every": every,
                      "cost_per_step_pct": round(100 * check_s / every / step_s, 4)}))


if __name__ == "__main__":
    main()
