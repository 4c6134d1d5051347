"""Which rank a "lost a peer" error points at (orchestrator/peer_loss.py), on message texts of
the kind gloo and NCCL print. The end-to-end case is tests/test_multinode.py's node crash."""

from __future__ import annotations

from orchestrator import peer_loss

GLOO_RESET = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
              "[10.213.0.12]:41231: Connection reset by peer")
GLOO_CLOSED = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.213.0.12]:41231"
NCCL_REMOTE = ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited "
               "or there was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a "
               "network error or a remote process exiting prematurely.")


def test_peer_lost_errors_are_told_from_a_ranks_own_errors():
    for text in (GLOO_RESET, GLOO_CLOSED, NCCL_REMOTE, "Broken pipe"):
        assert peer_loss.is_peer_lost(text), text
    for text in ("ValueError: bad batch at step 12", "CUDA error: an illegal memory access was encountered",
                 "Watchdog caught collective operation timeout", "", None):
        assert not peer_loss.is_peer_lost(text), text


def test_the_address_in_the_errors_names_the_silent_rank():
    ips = ["10.213.0.11", "10.213.0.12", "10.213.0.13"]
    assert peer_loss.named_addresses(GLOO_RESET) == {"10.213.0.12"}
    # ranks 0 and 2 reported; rank 1 (on the address they name) said nothing: it is the lost one
    assert peer_loss.suspect({0: GLOO_RESET, 2: GLOO_CLOSED}, ips) == 1
    # the first report alone already points at rank 1, not at the reporter
    assert peer_loss.suspect({2: GLOO_RESET}, ips) == 1
    # a rank that finished, or that reported itself, is never the suspect
    assert peer_loss.suspect({0: GLOO_RESET, 1: GLOO_RESET}, ips) is None
    assert peer_loss.suspect({0: GLOO_RESET}, ips, finished={1}) is None
    # NCCL names no address: no guess
    assert peer_loss.suspect({0: NCCL_REMOTE}, ips) is None


def test_one_address_for_every_rank_names_the_lowest_silent_one():
    """On one machine every rank has the same address: the lowest rank that did not report."""
    ips = ["127.0.0.1"] * 3
    assert peer_loss.suspect({0: GLOO_RESET.replace("10.213.0.12", "127.0.0.1")}, ips) == 1


def test_ranks_on_dead_nodes():
    assert peer_loss.ranks_on(["a", "b", "c", "b"], {"b"}) == [1, 3]
    assert peer_loss.ranks_on(["a", "b"], set()) == []


def test_an_unreachable_actor_is_a_death_ray_has_not_confirmed(monkeypatch):
    """A crashing node's actors first read "temporarily unavailable": the restart must not count on
    that node (the placement group is not kept); an actor Ray saw die leaves its node trusted."""
    import ray.exceptions as rx

    from orchestrator import cluster
    from orchestrator.controller import keeps_placement
    from orchestrator.failures import describe

    monkeypatch.setattr(cluster, "node_ips", lambda: {"node-a": "10.0.0.1", "node-b": "10.0.0.2"})
    gone = describe(rx.ActorUnavailableError("RpcError: Socket closed rpc_code: 14", None), 1, "training",
                    ["node-a", "node-b"], sdc_every=0)
    assert gone.kind.value == "died" and gone.data == {"unconfirmed": True, "unreachable": True} and not keeps_placement(gone)
    assert "rank 1 on node" in gone.message and "became unreachable" in gone.message
    died = describe(rx.ActorDiedError(), 1, "training", ["node-a", "node-b"], sdc_every=0)
    assert died.kind.value == "died" and died.data == {} and keeps_placement(died)
    assert "died (process killed or out of memory)" in died.message
