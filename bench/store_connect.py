"""How long a rank takes to connect to rank 0's TCPStore when the store starts listening late
(the rank came first, as happens at a restart's rendezvous): torch's client alone, against
`rendezvous.await_listening` first (what `rendezvous.join` does). Both sides in the same run, the
same delays, alternating. JSON on the last line."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from torch.distributed import TCPStore

from orchestrator import rendezvous

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib is beside us
from benchlib import machine  # noqa: E402


def connect_after(delay_s: float, wait_first: bool) -> float:
    """Seconds from the client's start to a connected client, the store listening `delay_s` late."""
    port = rendezvous.free_port()
    took: dict[str, float] = {}

    def client():
        t0 = time.monotonic()
        if wait_first:
            rendezvous.await_listening("127.0.0.1", port, 60)
        TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=60)).set("k", "v")
        took["s"] = time.monotonic() - t0

    t = threading.Thread(target=client)
    t.start()
    time.sleep(delay_s)
    server = TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60), wait_for_workers=False,
                      multi_tenant=False)
    t.join(timeout=120)
    assert server.get("k") == b"v" and "s" in took, "the client never got through"
    return took["s"]


def delays(text: str) -> list[float]:
    try:
        out = [int(x) / 1000 for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds like 0,50,200, got {text!r}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--delays-ms", type=delays, default="0,50,200", help="how late the store starts, e.g. 0,50,200")
    args = p.parse_args()
    rows = []
    for delay in args.delays_ms:
        runs = {"torch_alone": [], "await_listening": []}
        for _ in range(args.repeats):
            for name, wait_first in (("torch_alone", False), ("await_listening", True)):
                runs[name].append(connect_after(delay, wait_first))
        row = {"store_late_ms": round(delay * 1000)}
        for name, vals in runs.items():
            row[name + "_median_s"] = round(statistics.median(vals), 3)
            row[name + "_all_s"] = [round(v, 3) for v in vals]
        print(f"store {row['store_late_ms']} ms late: torch alone {row['torch_alone_median_s']} s, "
              f"await_listening first {row['await_listening_median_s']} s", file=sys.stderr)
        rows.append(row)
    print(json.dumps({"bench": "store_connect", "repeats": args.repeats, "rows": rows, "machine": machine()}))


if __name__ == "__main__":
    main()
