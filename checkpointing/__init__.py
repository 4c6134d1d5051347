"""Checkpoint format, async writer, staggered writes, retries, manifests, verification, retention.

Public API:
    Checkpointer (writer.py)           per rank: due(), save(), close(); async, staggered, committed
    make_checkpointer (worker.py)      a Checkpointer inside a Ray worker, from the coordinator handle
    load_latest / require_latest       newest committed checkpoint that verifies (loader.py)
    corrupt_recorder (records.py)      on_corrupt callback: marks a checkpoint corrupt in the store
    set_rng_state (format.py)          restore a rank's RNG states from LoadedCheckpoint.rank_state["rng"]
    resolve_uri / check_destination    where a run's checkpoints go, checked at launch (storage.py)
"""
