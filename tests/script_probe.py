"""What a script can see of how it was started (tests/test_script_restart.py compares a warm
start with `python script_probe.py` itself): prints one JSON line, then exits with --exit."""

import json
import os
import sys

torch_preloaded = "torch" in sys.modules  # before this script imports anything: a warm start

if __name__ == "__main__":
    exit_code = int(sys.argv[sys.argv.index("--exit") + 1]) if "--exit" in sys.argv else 0
    print(json.dumps({
        "argv": sys.argv, "file": __file__, "name": __name__, "cwd": os.getcwd(), "path0": sys.path[0],
        "env": dict(os.environ), "globals": sorted(k for k in globals() if k.startswith("__")),
        "spec": repr(__spec__), "package": __package__, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
        "stdin": os.readlink("/proc/self/fd/0"), "stdin_read": sys.stdin.read(),
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}")),
        "threads": len(os.listdir("/proc/self/task")), "torch_preloaded": torch_preloaded,
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    sys.exit(exit_code)
