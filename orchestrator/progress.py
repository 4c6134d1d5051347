"""Live progress lines for the driver: step, loss, tokens/s, ETA."""

from __future__ import annotations

import time


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Progress:
    def __init__(self, max_steps: int, every_s: float, out=print):
        self.max_steps = max_steps
        self.every_s = every_s
        self.out = out
        self.last_shown = time.monotonic()
        self.last_step = -1

    def due(self) -> bool:
        return time.monotonic() - self.last_shown >= self.every_s

    def show(self, p: dict, final: bool = False) -> None:
        self.last_shown = time.monotonic()
        step = p.get("step", -1)
        if step < 0 or (step == self.last_step and not final):
            return
        self.last_step = step
        parts = [f"step {step + 1}/{self.max_steps}"]
        if "train/loss" in p:
            parts.append(f"loss {p['train/loss']:.3f}")
        if "eval/loss" in p:
            parts.append(f"eval {p['eval/loss']:.3f}")
        if "train/tokens_per_s" in p:
            parts.append(f"{fmt_rate(p['train/tokens_per_s'])} tok/s")
        if "median_step_time_s" in p:
            parts.append(f"{p['median_step_time_s']:.3f} s/step")
            if not final:
                parts.append(f"eta {fmt_duration((self.max_steps - step - 1) * p['median_step_time_s'])}")
        self.out(" | ".join(parts))
