"""A Ray cluster of real nodes on one machine: a head on the host and worker nodes that each live
in their own network namespace (a veth pair to a bridge this harness creates, the node's own
address, its own hostname) and their own mount namespace (a private tmpfs as the node's local
disk). Faults are injected per node: crash (every process of the node killed), partition (its link
taken down on the bridge) and heal, and a full local disk.

Only what this harness creates is touched: the bridge, the namespaces and veths (named after this
process's pid), the processes it started (killed by pid, never by name; `ray stop` kills by name
and is never used), and a directory under /tmp. See docs/MULTINODE.md.

    cluster = NetnsCluster(workers=3)
    cluster.start()                  # head + 3 worker nodes, waits until Ray sees them all alive
    cluster.address                  # "10.213.X.1:PORT", for `orchestrator launch ... --address`
    cluster.env()                    # the environment a driver on the host needs (auth token ...)
    cluster.crash(1); cluster.partition(2); cluster.heal(2); cluster.fill_disk(3)
    cluster.ensure_healthy()         # every node up and idle again (restarts crashed, dead, busy or partitioned ones)
    cluster.close()                  # everything above removed, also after a failure

As pytest fixtures: `netns_cluster` (session scope; skips without root or `ip netns`),
`healthy_cluster` (the same, made healthy again before each test) and `bridge_s3` (a moto S3
server on the bridge's host address). `python -m tests.netns_cluster measure` prints how long Ray
takes to declare a crashed and a partitioned node dead.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBNETS = ipaddress.ip_network("10.213.0.0/16")  # one /24 of it per cluster, the first one free
ALLOC_LOCK = "\0orch-netns-subnet-allocation"  # an abstract Unix socket: a lock that leaves no file behind
CMD_TIMEOUT_S = 30  # any one `ip`/`nsenter` command
SLOW_START = "timed out during startup"  # `ray start` gave up waiting for its raylet (a fixed 30 s in Ray's node.py)
SLOW_START_RETRIES = 1
PROBE_MARK = "netns-probe: "  # the probe's answer line


class HarnessError(RuntimeError):
    pass


def _run(argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@contextlib.contextmanager
def _allocation_lock(timeout_s: float = 60.0):
    """Held while a cluster picks its /24 and creates its bridge, so two sessions starting at
    once do not pick the same one. Binding an abstract socket name succeeds for one holder at a
    time and is released when the socket closes (also when the process dies)."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                lock.bind(ALLOC_LOCK)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"could not take the subnet allocation lock in {timeout_s:.0f}s") from None
                time.sleep(0.1)
        yield
    finally:
        lock.close()


def _free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    ray = Path(sys.executable).parent / "ray"
    return str(ray) if ray.exists() else shutil.which("ray") or "ray"


@dataclass
class Node:
    """One Ray node. index 0 is the head (on the host); 1.. are worker nodes in namespaces."""

    index: int
    ip: str
    temp_dir: Path  # Ray's --temp-dir, per node (short: Unix socket paths are limited to 107 chars)
    log: Path  # stdout+stderr of its `ray start --block`
    netns: str | None = None
    veth_host: str | None = None  # the end on the bridge: down = partitioned
    hostname: str | None = None
    proc: subprocess.Popen | None = None
    node_id: str | None = None  # the Ray node id of its current incarnation
    past_ids: list[str] = field(default_factory=list)  # ids of its earlier incarnations
    starts: int = 0
    partitioned: bool = False  # its link is down now
    disturbed: bool = False  # it was partitioned since its `ray start`
    filler: str | None = None  # the file fill_disk wrote

    @property
    def name(self) -> str:
        return "head" if self.index == 0 else f"node{self.index}"


@dataclass
class NetnsCluster:
    workers: int = 3
    cpus_per_worker_node: int = 1
    head_cpus: int = 0  # ranks land on the namespaced nodes only
    local_disk_mb: int = 64
    object_store_mb: int = 100
    ready_timeout_s: float = 120.0
    python: str = sys.executable
    tag: str = field(default_factory=lambda: str(os.getpid()))
    nodes: list[Node] = field(default_factory=list)
    base: Path | None = None
    bridge: str | None = None
    subnet: ipaddress.IPv4Network | None = None
    port: int | None = None
    _created: list[tuple[str, str]] = field(default_factory=list)  # ("bridge"|"netns"|"veth", name), for teardown
    restarts: list[str] = field(default_factory=list)  # what ensure_healthy restarted, and why
    _pids: set[int] = field(default_factory=set)  # every `ray start` this harness started (a record; trees are found from them)

    # --- addresses ------------------------------------------------------------------------------

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def head_ip(self) -> str:
        return self.head.ip

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    @property
    def worker_nodes(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def local_dir(self) -> Path:
        """The node-local disk: the same path on every worker node, a different tmpfs on each (on the
        host and the head it is an empty directory of the host's disk)."""
        assert self.base is not None
        return self.base / "local"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for anything that talks to this cluster (the nodes, a driver on the host)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        # tests/conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for its loopback cluster: with it,
        # `ray start --address` refuses to join ("Multi-node Ray clusters are not supported") and a
        # driver takes 127.0.0.1 for its node address; unset, Ray's Linux default (clusters on) holds.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.base / "auth_token"),
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(extra)
        return env

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> NetnsCluster:
        """Create the network, start the head and the worker nodes, wait until all are alive. On
        any failure everything created so far is removed before the error propagates."""
        try:
            self._create_network()
            self._start_head()
            for node in self.worker_nodes:
                self._start_worker(node)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _create_network(self) -> None:
        self.base = Path(f"/tmp/on{self.tag}")
        if self.base.exists():
            raise HarnessError(f"{self.base} exists: another cluster with tag {self.tag} is running or was not cleaned up")
        self.base.mkdir(mode=0o755)
        self.local_dir.mkdir()
        (self.base / "auth_token").write_text(secrets.token_hex(32))
        (self.base / "auth_token").chmod(0o600)
        self.bridge = f"ob{self.tag}"[:15]
        with _allocation_lock():
            self.subnet = self._free_subnet()
            hosts = list(self.subnet.hosts())
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._created.append(("bridge", self.bridge))
            _run(["ip", "addr", "add", f"{hosts[0]}/{self.subnet.prefixlen}", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
        head_dir = self.base / "n0"
        self.nodes = [Node(0, str(hosts[0]), head_dir, self.base / "n0.log")]
        for i in range(1, self.workers + 1):
            node = Node(i, str(hosts[9 + i]), self.base / f"n{i}", self.base / f"n{i}.log",
                        netns=f"orch{self.tag}-n{i}", veth_host=f"ov{self.tag}h{i}"[:15],
                        hostname=f"orch{self.tag}-node{i}")
            self.nodes.append(node)
            self._create_node_network(node)
        for node in self.nodes:
            node.temp_dir.mkdir()
        # each worker node's own /etc/hosts (bind-mounted in its mount namespace): its hostname
        # resolves to its address, as on a cloud VM or a Kubernetes pod; gloo binds to what the
        # hostname resolves to (on this host it resolves to 127.0.0.1; see docs/MULTINODE.md)
        names = "".join(f"{n.ip}\t{n.hostname}\n" for n in self.worker_nodes)
        for node in self.worker_nodes:
            (self.base / f"hosts{node.index}").write_text(f"127.0.0.1\tlocalhost\n{names}")

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """The first /24 of 10.213.0.0/16 that no interface of the host has an address in."""
        used = set()
        for line in _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
            parts = line.split()
            if "inet" in parts:
                used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
        for net in SUBNETS.subnets(new_prefix=24):
            if not any(net.overlaps(u) for u in used):
                return net
        raise HarnessError(f"no free /24 left in {SUBNETS}")

    def _create_node_network(self, node: Node) -> None:
        ns, host_end, tmp_end = node.netns, node.veth_host, f"ov{self.tag}n{node.index}"[:15]
        _run(["ip", "netns", "add", ns])
        self._created.append(("netns", ns))
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", tmp_end])
        self._created.append(("veth", host_end))
        _run(["ip", "link", "set", tmp_end, "netns", ns])
        _run(["ip", "link", "set", host_end, "master", self.bridge])
        _run(["ip", "link", "set", host_end, "up"])
        _run(["ip", "-n", ns, "link", "set", tmp_end, "name", "eth0"])
        _run(["ip", "-n", ns, "addr", "add", f"{node.ip}/{self.subnet.prefixlen}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _spawn(self, node: Node, argv: list[str]) -> None:
        log = open(node.log, "ab")
        try:
            log.write(f"\n=== start {node.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(), cwd=REPO, start_new_session=True)
        finally:
            log.close()
        node.starts += 1
        if node.node_id:
            node.past_ids.append(node.node_id)
        node.node_id = None
        node.disturbed = False
        self._pids.add(node.proc.pid)

    def _ray_start_args(self, node: Node) -> list[str]:
        return ["--node-ip-address", node.ip, "--temp-dir", str(node.temp_dir), "--disable-usage-stats",
                "--object-store-memory", str(self.object_store_mb * 1024 * 1024), "--block"]

    def _start_head(self) -> None:
        self.port = _free_port()
        head = self.head
        ports = {"--ray-client-server-port": _free_port(), "--node-manager-port": _free_port(),
                 "--object-manager-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
                 "--dashboard-agent-grpc-port": _free_port(), "--metrics-export-port": _free_port(),
                 "--runtime-env-agent-port": _free_port()}
        argv = [_ray_bin(), "start", "--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                "--include-dashboard", "false", *[str(x) for kv in ports.items() for x in kv],
                *self._ray_start_args(head)]
        self._spawn(head, argv)

    def _start_worker(self, node: Node) -> None:
        """`ray start --block` inside the node's network namespace, in a fresh mount and UTS
        namespace: a private tmpfs on local_dir, its /etc/hosts, its hostname. The pid Popen returns
        is the `ray start` process itself (ip netns exec, unshare and sh each exec the next)."""
        script = ('mount -t tmpfs -o size="$1" orch-local "$2" && mount --bind "$3" /etc/hosts && hostname "$4" '
                  '&& shift 4 && exec "$@"')
        argv = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "sh", "-c", script, "sh", f"{self.local_disk_mb}m", str(self.local_dir),
                str(self.base / f"hosts{node.index}"), node.hostname,
                _ray_bin(), "start", "--address", self.address, "--num-cpus", str(self.cpus_per_worker_node),
                *self._ray_start_args(node)]
        self._spawn(node, argv)

    # --- what Ray sees --------------------------------------------------------------------------

    def probe(self, *, alive: list[str] = (), dead: list[str] = (), gone: list[str] = (), idle: bool = False,
              timeout_s: float = 0.0, poll_s: float = 0.5, since: float | None = None) -> dict:
        """ray.nodes() as seen by a driver on the host (a subprocess: this process may be connected
        to another cluster), polled until every IP in `alive` has an alive node (with every CPU free
        if `idle`; nodes whose id is in `gone` do not count) and neither an IP in `dead` nor a node
        id in `gone` is alive, for at most timeout_s. Returns {"nodes": [{node_id, ip, alive, cpus,
        free_cpus}], "met": bool, "waited_s": float, "dead_after_s": {ip: seconds from `since` (a
        time.time()) to the first poll that saw it dead}}."""
        argv = [self.python, "-m", "tests.netns_cluster", "probe", self.address, "--timeout", str(timeout_s),
                "--poll", str(poll_s), "--alive", ",".join(alive), "--dead", ",".join(dead), "--gone", ",".join(gone),
                "--since", str(time.time() if since is None else since), *(["--idle"] if idle else [])]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 90, env=self.env(), cwd=REPO)
        # Ray may print into the driver's output too (a dead raylet's stack trace, pushed to every driver)
        answer = [line for line in proc.stdout.splitlines() if line.startswith(PROBE_MARK)]
        if proc.returncode != 0 or not answer:
            raise HarnessError(f"probe of {self.address} failed ({proc.returncode}): "
                               f"{(proc.stderr.strip() or proc.stdout.strip())[-2000:]}")
        return json.loads(answer[-1][len(PROBE_MARK):])

    def alive_nodes(self) -> dict[str, str]:
        """ip -> node id of every alive node."""
        return {n["ip"]: n["node_id"] for n in self.probe()["nodes"] if n["alive"]}

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until Ray sees every node alive (bounded); records each node's id."""
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        for retry in range(SLOW_START_RETRIES + 1):
            deadline = time.monotonic() + timeout_s
            for node in self.nodes:  # a node whose `ray start` exited will never come up: say so now
                self._check_running(node, restart=retry < SLOW_START_RETRIES)
            past = [i for n in self.nodes for i in n.past_ids]  # earlier incarnations: gone, and not taken for the new one
            got = self.probe(alive=[n.ip for n in self.nodes], gone=past, timeout_s=max(1.0, deadline - time.monotonic()))
            if got["met"]:
                break
            alive = sorted((n["ip"], n["node_id"][:12]) for n in got["nodes"] if n["alive"])
            if not any([self._check_running(node, restart=retry < SLOW_START_RETRIES) for node in self.nodes]):
                raise HarnessError(f"after {timeout_s:.0f}s Ray sees alive {alive}, expected {[n.ip for n in self.nodes]} "
                                   f"and none of the earlier ids {[i[:12] for i in past]}; logs in {self.base}")
        by_ip = {n["ip"]: n["node_id"] for n in got["nodes"] if n["alive"] and n["node_id"] not in past}
        for node in self.nodes:
            node.node_id = by_ip[node.ip]

    def _check_running(self, node: Node, *, restart: bool = False) -> bool:
        """Raises when the node's `ray start` has exited. With `restart`, a worker node whose
        `ray start` gave up on Ray's fixed 30 s wait for its raylet to register (seen once on a
        busy machine, while another test started a cluster) is started again instead: True."""
        if node.proc is None or node.proc.poll() is None:
            return False
        log = node.log.read_text(errors="replace") if node.log.exists() else ""
        last = log[log.rfind("=== start"):]  # this incarnation's lines
        if restart and node.netns is not None and SLOW_START in last:
            self.restart_node(node.index)
            self.restarts.append(f"{node.name} restarted: its `ray start` timed out waiting for its raylet")
            return True
        raise HarnessError(f"{node.name}'s `ray start` exited {node.proc.returncode}:\n{log[-3000:]}")

    def last_words(self, node: Node) -> str:
        """The line of the node's `ray start` log that says why a Ray process of it died (raylet
        fatal errors are copied there by `ray start --block`), or its last line."""
        lines = [ln.strip() for ln in node.log.read_text(errors="replace").splitlines() if ln.strip()] \
            if node.log.exists() else []
        fatal = [ln for ln in lines if " C " in ln and "(raylet)" in ln] or [ln for ln in lines if "Failed to" in ln]
        return (fatal or lines or ["no log"])[-1][-300:]

    def node_by_id(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node of this cluster has id {node_id}")

    def node_by_ip(self, ip: str) -> Node:
        for node in self.nodes:
            if node.ip == ip:
                return node
        raise KeyError(f"no node of this cluster has address {ip}")

    # --- faults ---------------------------------------------------------------------------------

    def crash(self, index: int) -> list[int]:
        """Kill every process of a worker node at once (SIGKILL): a machine that died. Its mount
        namespace goes with its last process, and the tmpfs with it. Returns the pids killed."""
        node = self.nodes[index]
        if node.netns is None:
            raise HarnessError("crash() is for worker nodes; the head holds the cluster's GCS")
        killed = self._kill_node_processes(node)
        return killed

    def partition(self, index: int) -> None:
        """Take the node's link down on the bridge side: nothing in or out, no RST either (a cut
        cable or a dead switch port); processes keep running."""
        node = self.nodes[index]
        _run(["ip", "link", "set", node.veth_host, "down"])
        node.partitioned = node.disturbed = True

    def heal(self, index: int) -> None:
        node = self.nodes[index]
        _run(["ip", "link", "set", node.veth_host, "up"])
        _run(["ip", "link", "set", node.veth_host, "master", self.bridge])  # stays enslaved; idempotent
        node.partitioned = False

    def fill_disk(self, index: int, *, leave_bytes: int = 0) -> int:
        """Write a file on the node's local disk (its tmpfs) until ENOSPC, then give back
        leave_bytes of it. Returns the bytes the file holds."""
        node = self.nodes[index]
        node.filler = str(self.local_dir / ".orch-disk-filler")
        code = ("import errno,os,sys\n"
                "p, leave = sys.argv[1], int(sys.argv[2]); n = 0; chunk = b'\\0' * (1 << 20)\n"
                "with open(p, 'wb', buffering=0) as f:\n"
                "    for _ in range(1 << 20):\n"
                "        try:\n"
                "            n += f.write(chunk)\n"
                "        except OSError as e:\n"
                "            if e.errno != errno.ENOSPC: raise\n"
                "            small = b'\\0' * 4096\n"
                "            for _ in range(1 << 12):\n"
                "                try: n += f.write(small)\n"
                "                except OSError: break\n"
                "            break\n"
                "    if leave: f.truncate(max(0, n - leave)); n = max(0, n - leave)\n"
                "print(n)\n")
        out = self.run_on(index, [self.python, "-c", code, node.filler, str(leave_bytes)], timeout=120)
        return int(out.stdout.strip())

    def free_disk(self, index: int) -> None:
        node = self.nodes[index]
        if node.filler:
            self.run_on(index, ["rm", "-f", node.filler])
            node.filler = None

    def run_on(self, index: int, argv: list[str], *, timeout: float = CMD_TIMEOUT_S,
               check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on a worker node: in its network, mount and UTS namespaces (it sees the
        node's local disk and address). The node's `ray start` process must be running."""
        node = self.nodes[index]
        if node.proc is None or node.proc.poll() is not None:
            raise HarnessError(f"{node.name} is not running; its mount namespace is gone")
        return _run(["nsenter", "--target", str(node.proc.pid), "--mount", "--net", "--uts", "--", *argv],
                    check=check, timeout=timeout, env=self.env(), cwd=REPO)

    # --- recovery -------------------------------------------------------------------------------

    def restart_node(self, index: int) -> None:
        """A fresh incarnation of a worker node in the same namespace (new Ray node id, empty
        local disk). The old one is stopped gracefully first when it still runs (its raylet tells
        the GCS it leaves, so Ray drops it at once instead of after ~15 s of failed health checks,
        during which it would still take work), then whatever is left is killed."""
        node = self.nodes[index]
        if node.partitioned:
            self.heal(index)
        self._stop_gracefully(node)
        self._kill_node_processes(node)
        self._start_worker(node)

    def _stop_gracefully(self, node: Node, grace_s: float = 15.0) -> None:
        """SIGTERM to every process of the node (what `ray stop` sends, by pid here), then wait
        for them to exit, bounded."""
        for pid in self._node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if node.proc is not None:
                node.proc.poll()  # reap our own child so it does not count as running
            left = self._node_pids(node) - ({node.proc.pid} if node.proc and node.proc.returncode is not None else set())
            if not left:
                break
            time.sleep(0.2)

    def ensure_healthy(self, timeout_s: float | None = None, settle_s: float = 15.0) -> list[str]:
        """Every link up, every worker node running, alive in Ray and idle (all its CPUs free, once
        an earlier run's actors are gone: up to settle_s). A node that is not, or that was
        partitioned since the last call, is restarted: after a partition Ray may hold its CPU for a
        placement group it failed to remove (docs/MULTINODE.md). Returns why each was restarted."""
        why = {}
        for node in self.worker_nodes:
            if node.partitioned:
                self.heal(node.index)
        got = self.probe(alive=[n.ip for n in self.worker_nodes], idle=True, timeout_s=settle_s)
        seen = {n["node_id"]: n for n in got["nodes"] if n["alive"]}
        for node in self.worker_nodes:
            info = seen.get(node.node_id)
            if node.proc is None or node.proc.poll() is not None:
                why[node.index] = (f"its `ray start` had exited ({node.proc.returncode if node.proc else 'never started'}"
                                   f"{'; ' + self.last_words(node) if node.proc else ''})")
            elif info is None:
                why[node.index] = "Ray had it dead"
            elif info["free_cpus"] < info["cpus"]:
                why[node.index] = f"{info['free_cpus']:g} of {info['cpus']:g} CPUs free after {settle_s:g}s"
            elif node.disturbed:
                why[node.index] = "was partitioned (alive and idle, but not trusted)"
        for index in why:
            self.restart_node(index)
        self.wait_ready(timeout_s)
        notes = [f"{self.nodes[i].name} restarted: {w}" for i, w in why.items()]
        self.restarts += notes
        return notes

    # --- teardown -------------------------------------------------------------------------------

    def _node_pids(self, node: Node) -> set[int]:
        """Every process of a node: the tree under its `ray start`, plus, for a worker node, every
        process in its network namespace (orphans re-parented away from the tree included)."""
        import psutil

        pids: set[int] = set()
        if node.proc is not None:
            try:
                root = psutil.Process(node.proc.pid)
                pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        if node.netns is not None:
            out = _run(["ip", "netns", "pids", node.netns], check=False)
            pids |= {int(p) for p in out.stdout.split() if p.isdigit()}
        pids.discard(os.getpid())
        return pids

    def _kill_node_processes(self, node: Node) -> list[int]:
        """Freeze the node's processes (SIGSTOP: none can fork or react), look again until the set
        is stable, then SIGKILL them all and reap. Bounded in rounds and time."""
        frozen: set[int] = set()
        for _ in range(20):
            found = self._node_pids(node) - frozen
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            frozen |= found
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._node_pids(node) - {node.proc.pid if node.proc else -1}:
            for pid in self._node_pids(node):  # stragglers that were forked mid-freeze
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        return sorted(frozen)

    def close(self) -> None:
        """Stop every node (by pid), delete the namespaces, veths and the bridge, remove the
        directory. Safe to call twice and after a partial start; raises at the end if something
        could not be removed (after trying everything)."""
        problems = []
        for node in reversed(self.nodes):  # workers first, then the head
            try:
                self._kill_node_processes(node)
            except Exception as e:  # keep going: the network must still be removed
                problems.append(f"{node.name}: {e}")
        for kind, name in reversed(self._created):
            argv = {"netns": ["ip", "netns", "del", name], "veth": ["ip", "link", "del", name],
                    "bridge": ["ip", "link", "del", name]}[kind]
            proc = _run(argv, check=False)
            if proc.returncode != 0 and "Cannot find" not in proc.stderr and "No such file" not in proc.stderr:
                problems.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
        # deleting a namespace removes its veth end asynchronously: wait for every name to be gone
        links = [name for kind, name in self._created if kind in ("veth", "bridge")]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            left = [n for n in links if _run(["ip", "link", "show", n], check=False).returncode == 0]
            if not left:
                break
            for n in left:
                _run(["ip", "link", "del", n], check=False)
            time.sleep(0.2)
        else:
            problems.append(f"links left: {left}")
        namespaces = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        problems += [f"netns left: {ns}" for kind, ns in self._created if kind == "netns" and ns in namespaces]
        self._created.clear()
        if self.base is not None and self.base.exists():
            mounts = Path("/proc/self/mountinfo").read_text()
            if str(self.base) in mounts:  # never rm -r through a mount
                problems.append(f"something is mounted under {self.base} in the host's namespace")
            else:
                shutil.rmtree(self.base, ignore_errors=True)
        if problems:
            raise HarnessError("teardown: " + "; ".join(problems))

    def __enter__(self) -> NetnsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# --- pytest ---------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why this machine cannot run the harness, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    name = f"orch{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=CMD_TIMEOUT_S)
    return None


@pytest.fixture(scope="session")
def netns_cluster():
    """A head and 3 worker nodes (1 CPU each, the head 0), shared by the session's tests."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"namespaced multi-node cluster unavailable: {reason}")
    cluster = NetnsCluster(workers=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def healthy_cluster(netns_cluster):
    """The session's cluster with every node up and idle, whatever an earlier test did to it."""
    for note in netns_cluster.ensure_healthy():
        print(note)
    return netns_cluster


@pytest.fixture(scope="session")
def bridge_s3(netns_cluster):
    """A moto S3 server on the bridge's host address, reachable from every node:
    (endpoint_url, make_bucket) where make_bucket() returns a fresh bucket's name."""
    import logging
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log: one line per S3 call
    port = _free_port(netns_cluster.head_ip)
    server = ThreadedMotoServer(ip_address=netns_cluster.head_ip, port=port, verbose=False)
    server.start()
    endpoint = f"http://{netns_cluster.head_ip}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")

    def make_bucket() -> str:
        bucket = f"mn-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        return bucket

    try:
        yield endpoint, make_bucket
    finally:
        server.stop()


# --- the probe (run as `python -m tests.netns_cluster probe ADDRESS ...`) -------------------------


def _probe_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=0.0)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--alive", default="")
    p.add_argument("--dead", default="")
    p.add_argument("--gone", default="", help="node ids that must not be alive (and do not count for --alive)")
    p.add_argument("--since", type=float, default=None)
    p.add_argument("--idle", action="store_true", help="also wait until the alive nodes' CPUs are all free")
    a = p.parse_args(argv)
    since = time.time() if a.since is None else a.since
    import logging

    import ray
    from ray._private.state import available_resources_per_node  # a DeveloperAPI: free resources by node

    want_alive = [x for x in a.alive.split(",") if x]
    want_dead = [x for x in a.dead.split(",") if x]
    gone = {x for x in a.gone.split(",") if x}
    ray.init(address=a.address, logging_level=logging.ERROR, log_to_driver=False, namespace="netns-probe")
    t0 = time.monotonic()
    dead_after: dict[str, float] = {}
    try:
        for _ in range(max(1, int(a.timeout / max(a.poll, 0.05)) + 2)):  # bounded in count and time
            free = available_resources_per_node()
            nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
                      "cpus": n.get("Resources", {}).get("CPU", 0),
                      "free_cpus": free.get(n["NodeID"], {}).get("CPU", 0)} for n in ray.nodes()]
            current = [n for n in nodes if n["alive"] and n["node_id"] not in gone]
            alive = {n["ip"] for n in nodes if n["alive"]}
            busy = {n["ip"] for n in current if n["free_cpus"] < n["cpus"]}
            for ip in want_dead:
                if ip not in alive:
                    dead_after.setdefault(ip, round(time.time() - since, 1))
            met = (all(ip in {n["ip"] for n in current} and not (a.idle and ip in busy) for ip in want_alive)
                   and not any(ip in alive for ip in want_dead)
                   and not any(n["alive"] and n["node_id"] in gone for n in nodes))
            if met or time.monotonic() - t0 >= a.timeout:
                break
            time.sleep(a.poll)
        print(PROBE_MARK + json.dumps({"nodes": nodes, "met": met, "waited_s": round(time.monotonic() - t0, 2),
                          "dead_after_s": dead_after}))
    finally:
        ray.shutdown()
    return 0


def _measure_main(argv: list[str]) -> int:
    """How long Ray takes to declare a node dead after a crash and after a partition (both at
    once, on a fresh 3-node cluster), and what a partitioned node does when its link comes back.
    Prints one JSON object on its last line; see docs/MULTINODE.md."""
    p = argparse.ArgumentParser(prog="python -m tests.netns_cluster measure")
    p.add_argument("--timeout", type=float, default=180.0)
    a = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot measure: {reason}")
    result: dict = {}
    with NetnsCluster(workers=3) as cluster:
        crashed, cut = cluster.nodes[1], cluster.nodes[2]
        t0 = time.time()
        cluster.crash(crashed.index)
        cluster.partition(cut.index)
        got = cluster.probe(dead=[crashed.ip, cut.ip], timeout_s=a.timeout, poll_s=0.5, since=t0)
        result["declared_dead_after_s"] = {"crash": got["dead_after_s"].get(crashed.ip),
                                           "partition": got["dead_after_s"].get(cut.ip)}
        cluster.heal(cut.index)
        healed = time.monotonic()
        for _ in range(300):  # bounded: 60 s
            if cut.proc.poll() is not None:
                break
            time.sleep(0.2)
        result["after_heal"] = (f"`ray start` exited {cut.proc.returncode} {time.monotonic() - healed:.1f}s after "
                                "the link came back" if cut.proc.poll() is not None else "still running after 60s")
        log = cut.log.read_text(errors="replace")
        result["raylet_said"] = next((line.split("(raylet)", 1)[-1].strip() for line in log.splitlines()
                                      if "GCS consider this node to be dead" in line), None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    mode, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if mode == "probe":
        sys.exit(_probe_main(rest))
    if mode == "measure":
        sys.exit(_measure_main(rest))
    sys.exit("usage: python -m tests.netns_cluster probe ADDRESS [--alive IPS] [--dead IPS] [--timeout S]\n"
             "       python -m tests.netns_cluster measure")
