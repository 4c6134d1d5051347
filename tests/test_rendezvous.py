"""Joining the group: a rank other than 0 waits for rank 0's store before torch connects to it."""

import threading
from datetime import timedelta

from orchestrator import rendezvous


def test_a_rank_waits_for_a_store_that_listens_late_and_then_talks_to_it():
    from torch.distributed import TCPStore

    port = rendezvous.free_port()
    hosted: dict = {}
    started = threading.Event()

    def host():
        started.wait(timeout=60)  # after the wait began: the store is late on purpose
        hosted["store"] = TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60),
                                   wait_for_workers=False, multi_tenant=True)

    t = threading.Thread(target=host)
    t.start()
    started.set()
    assert rendezvous.await_listening("127.0.0.1", port, 120)
    t.join(timeout=120)
    client = TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=60))
    client.set("k", "v")  # the probe's closed connection left the server serving
    assert hosted["store"].get("k") == b"v"


def test_nobody_listening_is_false_after_the_bound():
    port = rendezvous.free_port()  # nothing listens there
    assert rendezvous.await_listening("127.0.0.1", port, 0.3) is False
