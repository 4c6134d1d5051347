"""One actor per rank: a process on its reserved bundle that runs what the controller sends it
(orchestrator/rendezvous.py's join, then orchestrator/rank.py's run). Functions travel by
reference, so the actor stays a shell and the logic stays testable without Ray."""

from __future__ import annotations

import os
import socket


class TrainWorker:
    def node_info(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def execute(self, fn, /, *args, **kwargs):
        return fn(*args, **kwargs)
