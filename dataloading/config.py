"""The `data` config section, owned by the data-loading component. Imports no ML framework."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.schema import option


class ShuffleMode(str, Enum):
    AUTO = "auto"  # global for local datasets, block for remote ones (s3://, gs://, ...)
    GLOBAL = "global"  # a full keyed permutation of all sequences: best mixing, random access
    BLOCK = "block"  # shuffle shard-sized blocks, then sequences within a window of blocks


@dataclass
class DataConfig:
    uri: str = option("", help="token dataset written by `orchestrator data prepare`")
    global_batch_size: int = option(16, min=1, max=2**24)
    shuffle: ShuffleMode = option(ShuffleMode.AUTO, help="global | block | auto (block when remote)")
    block_size: int = option(0, min=0, max=2**32, help="block mode: sequences per block; 0 = the dataset's shard size")
    window_blocks: int = option(4, min=1, max=100_000, help="block mode: blocks mixed together (bounds the node cache)")
    cache_dir: str = option("", help="node-local cache for remote shards; '' = <tmpdir>/orchestrator-shards")
    cache_size_mb: int = option(8192, min=1, max=2**30, help="cache bound; shards not needed soon are evicted past it")
    prefetch_steps: int = option(8, min=0, max=100_000, help="global batches whose shards are fetched ahead of use")
    verify_local: bool = option(False, help="also sha256 local shards when first opened (remote: always)")
    storage_options: dict[str, Any] = option({}, help="fsspec options for the data URI (e.g. client_kwargs)")
