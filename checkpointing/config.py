"""The `checkpoint` config section, owned by the checkpointing component."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.schema import option


@dataclass
class CheckpointConfig:
    uri: str | None = option(None, help="any fsspec URL; default $ORCHESTRATOR_HOME/checkpoints/RUN_ID")
    every_steps: int = option(0, min=0, help="0 saves only at the end")
