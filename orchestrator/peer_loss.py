"""Whom to blame when a rank fails because it lost a peer.

When a rank's process or its whole node dies, the kernel answers for it at once: the other
ranks' collectives fail with "Connection reset by peer" (gloo) or ncclRemoteError (NCCL). Ray
reports the dead actor later: a killed process within a second or so, a crashed node only once
the GCS's health checks of it have failed (~15 s with Ray 2.60's defaults, docs/MULTINODE.md).
So the first error the driver sees is usually a survivor's, and blaming the first rank that
reported names the wrong rank and node.

These rules are pure (worker_group.py gathers the evidence): which errors are a lost peer, and
which rank they point at when Ray has not said anything yet.
"""

from __future__ import annotations

import re

# a collective failed because the other end went away (not because this rank did something wrong)
PEER_LOST = re.compile(
    r"Connection reset by peer|Connection closed by peer|Connection closed by remote peer|Broken pipe|"
    r"ncclRemoteError|remote process exited|ECONNRESET|EPIPE", re.IGNORECASE)
# gloo names the peer as [ADDRESS]:PORT (or ADDRESS:PORT)
ADDRESS = re.compile(r"\[?\b(\d{1,3}(?:\.\d{1,3}){3})\]?:\d{1,5}\b")


def is_peer_lost(text: str | None) -> bool:
    return bool(text) and PEER_LOST.search(text) is not None


def named_addresses(text: str | None) -> set[str]:
    return set(ADDRESS.findall(text or ""))


def suspect(reports: dict[int, str], ips: list[str], finished: set[int] = frozenset()) -> int | None:
    """The rank a group's peer-lost errors point at, before Ray has confirmed anything.

    reports: rank -> its error text (every rank that reported a lost peer); ips: each rank's node
    address; finished: ranks whose call ended without error. The suspect is a rank that did not
    report (its call is still running, or hangs on a dead host) on an address the errors name;
    the lowest such rank, or None when the errors name no address of a silent rank."""
    named = set().union(*(named_addresses(t) for t in reports.values())) if reports else set()
    silent = [r for r in range(len(ips)) if r not in reports and r not in finished]
    on_named = [r for r in silent if ips[r] in named]
    return on_named[0] if on_named else None


def ranks_on(nodes: list[str], dead: set[str]) -> list[int]:
    """Ranks (in order) whose node is among `dead`."""
    return [r for r, n in enumerate(nodes) if n in dead]
