"""Writes docs/CONFIG.md from the config dataclasses: `python -m orchestrator.config_doc`."""

from __future__ import annotations

import sys
from pathlib import Path

from common.schema import describe
from orchestrator.config import Config

HEADER = """# Configuration reference

Generated from the config dataclasses by `python -m orchestrator.config_doc`; a test fails when
this file and the code disagree. Every key is optional. Set keys in the YAML file or override
them on the command line: `orchestrator launch c.yaml train.max_steps=100 optim.lr=1e-3`
(values are parsed as YAML: numbers, true/false, null, [lists]). Numbers must be finite (no
`.nan`, `.inf`); a whole number may be written `1e6`; ranges in parentheses are inclusive.

| key | type | default | meaning |
| --- | --- | --- | --- |
"""


def render() -> str:
    rows = [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in describe(Config)]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
    out.write_text(render())
    print(f"wrote {out}")
