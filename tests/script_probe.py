"""What a script can see of how it was started (tests/test_script_restart.py compares a warm
start with `python script_probe.py` itself): prints one JSON line, then exits with --exit.

With --store: the rendezvous instead. The script joins the group (env://, gloo) and prints one
"STORE {json}" line: the agent-store variable, whether the store's listening socket is in this
process (a script that hosts the store itself) or elsewhere, and whether a key set by an earlier
attempt is visible. On attempt 0 rank 0 sets that key, then rank 1 SIGKILLs itself."""

import json
import os
import signal
import sys

torch_preloaded = "torch" in sys.modules  # before this script imports anything: a warm start
compiler_preloaded = "torch._inductor" in sys.modules  # what DDP and deterministic mode import on first use
STALE_KEY = "probe/set-by-attempt-0"


def listeners(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` on this machine (state 0A in /proc/net/tcp{,6})."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]  # noqa: SIM115
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                out.add(int(f[9]))
    return out


def own_sockets() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def store_probe() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):  # the TCPStore itself: keys as set, no prefix
        store = store.underlying_store
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    port = int(os.environ["MASTER_PORT"])
    stale = store.check([STALE_KEY])
    listening = listeners(port)
    print("STORE " + json.dumps({
        "rank": dist.get_rank(), "attempt": attempt, "use_agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"),
        "port": port, "listening": bool(listening), "hosted_here": bool(listening & own_sockets()),
        "stale_key_visible": stale}), flush=True)
    if attempt == 0:
        if dist.get_rank() == 0:
            store.set(STALE_KEY, "1")
        dist.barrier()  # the key is set before rank 1 goes
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()  # fails: the peer is gone (or SIGTERM from the restart in place)
    dist.barrier()
    dist.destroy_process_group()
    print("done", flush=True)


if __name__ == "__main__":
    if "--store" in sys.argv:
        store_probe()
        sys.exit(0)
    exit_code = int(sys.argv[sys.argv.index("--exit") + 1]) if "--exit" in sys.argv else 0
    print(json.dumps({
        "argv": sys.argv, "file": __file__, "name": __name__, "cwd": os.getcwd(), "path0": sys.path[0],
        "env": dict(os.environ), "globals": sorted(k for k in globals() if k.startswith("__")),
        "spec": repr(__spec__), "package": __package__, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
        "stdin": os.readlink("/proc/self/fd/0"), "stdin_read": sys.stdin.read(),
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}")),
        "threads": len(os.listdir("/proc/self/task")), "torch_preloaded": torch_preloaded,
        "compiler_preloaded": compiler_preloaded,
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    sys.exit(exit_code)
