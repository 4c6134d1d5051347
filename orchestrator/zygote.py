"""Warm script processes: a small Python process beside a rank's worker ("zygote") that imports
torch (WARM_MODULES, WARM_IF_POSSIBLE) once and, on request, forks a child that becomes the
user's script, so neither the first attempt nor a restart pays `import torch` in the new script
process.

The zygote is started with exec (subprocess), never forked from the worker: a Ray worker runs
many threads, and a fork copies only the calling one, with whatever locks the others held. The
zygote itself stays single-threaded (checked in /proc/self/task before every fork; otherwise it
refuses and the worker starts the script with exec).

The child does what `python SCRIPT ARGS` would: argv, cwd, environment, sys.path[0] (the
script's folder), stdin from /dev/null, stdout/stderr and the worker-log pipe on the numbers the
worker chose, a fresh `__main__` module with the script's `__file__`, exit codes and signals as
the interpreter gives them. What it can tell: torch, numpy and this module are already in
sys.modules, and the hash seed of str (PYTHONHASHSEED) is the zygote's.

Protocol (one AF_UNIX SOCK_SEQPACKET pair, JSON messages, fds passed with SCM_RIGHTS):
  zygote -> worker  {"ready": pid} once imported, or {"error": why}
  worker -> zygote  {"argv", "cwd", "env", "fds": [n, ...]}  + the fds to put at those numbers
  zygote -> worker  {"pid": child} or {"error": why}; later {"exit": child, "code": returncode}
The worker's end closing (its process died) makes the zygote kill its child and exit.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

WARM_MODULES = ("torch", "torch.distributed", "numpy")
# and if they import: torch._inductor (with torch._dynamo), what DDP's constructor and
# torch.use_deterministic_algorithms import on first use, ~1 s of CPU that a new script process
# would otherwise pay before its first step (a script that needs them and cannot import them
# fails on its own, as it would under torchrun)
WARM_IF_POSSIBLE = ("torch._inductor",)
# variables read while those modules are imported (thread pools, allocator, interpreter flags,
# compiler configs): the child would keep the zygote's values, so a request that sets them
# differently is refused
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "GOTO_", "KMP_", "GOMP_", "LD_", "GLIBC_TUNABLES",
                   "TORCHINDUCTOR_", "TORCHDYNAMO_")
READY_WAIT_S = 300.0  # the zygote's imports on a loaded machine; past this the script is exec'd
MSG_MAX = 1 << 20
PR_SET_PDEATHSIG = 1


def import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


# --- the worker's side ------------------------------------------------------------------------


class Unavailable(Exception):
    """The zygote cannot start this script: the worker starts it with exec instead."""


class Zygote:
    """The worker's handle on its zygote (one per worker process, see `get`)."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = mine
        self.lock = threading.Lock()  # one request at a time
        self.exits: dict[int, int] = {}  # child pid -> return code, as reported
        self.ready: int | None = None
        self.error: str | None = None
        try:
            nice = os.getpriority(os.PRIO_PROCESS, os.getppid())  # see serve()
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.zygote", str(theirs.fileno()), str(nice)],
                                         env={**self.env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()

    def alive(self) -> bool:
        return self.error is None and self.proc.poll() is None

    def _recv(self, timeout_s: float | None) -> dict:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(MSG_MAX)
        except TimeoutError:
            raise Unavailable(f"the warm process did not answer within {timeout_s:.0f}s") from None
        except OSError as e:
            raise Unavailable(f"the warm process is gone ({e})") from None
        if not data:
            raise Unavailable("the warm process is gone")
        return json.loads(data)

    def _wait_ready(self) -> None:
        if self.ready is not None:
            return
        msg = self._recv(READY_WAIT_S)
        if "error" in msg:
            raise Unavailable(msg["error"])
        self.ready = msg["ready"]

    def spawn(self, argv: list[str], *, cwd: str, env: dict[str, str], fds: dict[int, int]) -> WarmProcess:
        """A child running argv[1:] as `python argv[1] ...` would; fds: number in the child -> fd here."""
        if import_env(env) != import_env(self.env):
            diff = sorted(k for k in set(import_env(env)) | set(import_env(self.env))
                          if env.get(k) != self.env.get(k))
            raise Unavailable(f"the script's environment differs from the warm process's in {', '.join(diff)}")
        with self.lock:
            try:
                self._wait_ready()
                numbers = sorted(fds)
                socket.send_fds(self.sock, [json.dumps({"argv": argv, "cwd": cwd, "env": env,
                                                        "fds": numbers}).encode()], [fds[n] for n in numbers])
                msg = self._reply()
            except Unavailable as e:
                self.error = str(e)
                raise
            except OSError as e:
                self.error = f"the warm process is gone ({e})"
                raise Unavailable(self.error) from None
        if "error" in msg:
            raise Unavailable(msg["error"])
        return WarmProcess(self, msg["pid"])

    def _reply(self) -> dict:
        """The answer to a spawn request (an earlier child's exit report may come first)."""
        while True:
            msg = self._recv(60.0)
            if "exit" not in msg:
                return msg
            self.exits[msg["exit"]] = msg["code"]

    def wait_exit(self, pid: int) -> int:
        """The child's return code once the zygote reports it (-SIGKILL if the zygote itself is
        gone: its children die with it)."""
        while pid not in self.exits:
            try:
                msg = self._recv(None)
            except Unavailable as e:
                self.error = str(e)
                return -signal.SIGKILL
            if "exit" in msg:
                self.exits[msg["exit"]] = msg["code"]
        return self.exits.pop(pid)

    def close(self) -> None:
        self.sock.close()  # the zygote sees the end of its socket and exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WarmProcess:
    """What script.py needs of a subprocess.Popen, for a child of the zygote."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None
        self.stdout = self.stderr = None  # set by the caller (it made the pipes)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.wait_exit(self.pid)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode  # wait() runs in the rank's main call from the start

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # the zygote has not reaped it: the pid is still this child
            os.kill(self.pid, sig)

    def kill(self) -> None:
        try:
            self.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass


_zygote: Zygote | None = None


def get(env: dict[str, str] | None = None, *, start: bool = True) -> Zygote | None:
    """This worker's zygote (started on first use with `env`, default os.environ)."""
    global _zygote
    if _zygote is not None and not _zygote.alive():
        _zygote = None
    if _zygote is None and start:
        _zygote = Zygote(env if env is not None else dict(os.environ))
    return _zygote


# --- the zygote's side ----------------------------------------------------------------------


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _warm_up() -> str | None:
    """Import the heavy modules without starting a thread. OpenBLAS (numpy's) starts its pool when
    loaded unless told it has one thread; the child gets the count its own environment asks for."""
    forced = "OPENBLAS_NUM_THREADS" not in os.environ
    if forced:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import importlib

        for name in WARM_MODULES:
            importlib.import_module(name)
        for name in WARM_IF_POSSIBLE:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 (the script imports it itself, if it needs it)
                pass
    except Exception as e:  # noqa: BLE001 (any import failure: the worker falls back to exec)
        return f"cannot import {name}: {type(e).__name__}: {e}"
    finally:
        if forced:
            del os.environ["OPENBLAS_NUM_THREADS"]
    n = _threads()
    return None if n == 1 else f"{n} threads after importing {', '.join(WARM_MODULES + WARM_IF_POSSIBLE)}"


def serve(fd: int, nice: int):
    """The zygote's loop. Returns only in a forked child: the job it is to run.

    nice: the niceness of the worker's parent (the raylet). Ray starts workers at 15; a rank
    goes back to its raylet's (priority.normal_priority), and so do its scripts, when allowed."""
    sock = socket.socket(fileno=fd)
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:  # not permitted: stays as it is
        pass
    sys.stdout.flush()
    why = _warm_up()
    sock.send(json.dumps({"error": why} if why else {"ready": os.getpid()}).encode())
    if why:
        return None
    children: dict[int, int] = {}  # pidfd -> child pid
    while True:
        readable, _, _ = select.select([sock, *children], [], [])
        for pidfd in [r for r in readable if r in children]:
            pid = children.pop(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if sock not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MSG_MAX, 16)
        except OSError:
            data, fds = b"", []
        if not data:  # the worker is gone: so are its scripts
            for pid in children.values():
                os.kill(pid, signal.SIGKILL)
            return None
        req = json.loads(data)
        n = _threads()
        if n != 1:
            sock.send(json.dumps({"error": f"the warm process has {n} threads; not forking"}).encode())
            for f in fds:
                os.close(f)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            return _Job(req, fds, parent)
        for f in fds:
            os.close(f)
        children[os.pidfd_open(pid)] = pid
        sock.send(json.dumps({"pid": pid}).encode())


class _Job:
    """In the forked child: become `python SCRIPT ARGS`."""

    def __init__(self, req: dict, fds: list[int], parent: int):
        self.req, self.fds, self.parent = req, fds, parent  # the zygote's own fds are closed in setup

    def setup(self) -> str:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:  # the zygote died before prctl took effect
            os._exit(128 + signal.SIGKILL)
        want = dict(zip(self.req["fds"], self.fds, strict=True))
        moved = {}  # out of the way of the target numbers first
        for n, f in want.items():
            g = os.dup(f)
            while g in want:
                g = os.dup(f)
            moved[n] = g
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for n, g in moved.items():
            os.dup2(g, n)
        keep = {0, 1, 2, *want}
        for f in map(int, os.listdir("/proc/self/fd")):
            if f not in keep:
                try:
                    os.close(f)
                except OSError:
                    pass  # the listing's own fd
        os.chdir(self.req["cwd"])
        os.environ.clear()
        os.environ.update(self.req["env"])
        argv = self.req["argv"]
        script = os.path.abspath(argv[1])
        sys.argv = argv[1:]
        sys.orig_argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        _reseed()
        _blas_threads()
        return script

    def run(self) -> None:
        """Run the script as __main__; end the process as the interpreter would."""
        import builtins
        import importlib.machinery
        import types

        try:
            script = self.setup()
        except Exception as e:  # noqa: BLE001 (told on the script's stderr, which the worker reads)
            print(f"orchestrator: cannot start the script in the warm process: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            os._exit(1)
        main = types.ModuleType("__main__")
        main.__dict__.update(__file__=script, __builtins__=builtins, __cached__=None, __package__=None, __annotations__={},
                             __spec__=None, __loader__=importlib.machinery.SourceFileLoader("__main__", script))
        sys.modules["__main__"] = main
        try:
            with open(script, "rb") as f:
                code = compile(f.read(), script, "exec")
            exec(code, main.__dict__)  # noqa: S102 (the user's script, as python runs it)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 (printed as Python prints an uncaught one)
            sys.excepthook(type(e), e, e.__traceback__.tb_next)  # without this frame
            if isinstance(e, KeyboardInterrupt):  # Python ends by SIGINT then
                sys.stderr.flush()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            raise SystemExit(1) from None


def _reseed() -> None:
    """`random` reseeds itself after a fork; numpy's global generator does not: as in a fresh process."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def _blas_threads() -> None:
    """The OpenBLAS pool size a fresh process would start with (the zygote loaded it with one)."""
    env = os.environ
    for key in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        if env.get(key, "").strip():
            try:
                n = int(env[key].split(",")[0])
            except ValueError:
                n = 1
            break
    else:
        n = len(os.sched_getaffinity(0))
    if n <= 1:
        return
    import ctypes

    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1]}
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for name in ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads"):
            fn = getattr(handle, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def main() -> None:
    job = serve(int(sys.argv[1]), int(sys.argv[2]))
    if job is None:
        return
    job.run()


if __name__ == "__main__":
    main()
