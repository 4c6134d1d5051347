"""The `data` config section, owned by the data-loading component."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.schema import option


@dataclass
class DataConfig:
    uri: str = option("", help="token dataset written by `orchestrator data prepare`")
    global_batch_size: int = option(16, min=1)
