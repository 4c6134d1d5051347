"""`make test` runs two pytest-xdist workers with --dist loadgroup: tests sharing a file's module
fixture (a launched run, a namespaced cluster: a minute each to build) must land on one worker,
or each worker builds it. pytest 9.2 with xdist 3.8 silently stopped grouping; this notices."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SHARED = 6  # tests sharing the fixture; with grouping broken, load scheduling spreads them


def test_a_files_module_fixture_is_built_once_under_loadgroup(tmp_path):
    built = tmp_path / "built"
    (tmp_path / "conftest.py").write_text(
        "import pytest\n"
        "from tests.grouping import tag_groups\n\n"
        "@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_collection_modifyitems(config, items):\n"
        "    tag_groups(config, items)\n")
    body = [
        "import os, time", "import pytest", "",
        "@pytest.fixture(scope='module')",
        "def shared():",
        f"    with open({str(built)!r}, 'a') as f:",
        "        f.write(f'{os.getpid()}\\n')",
        "    time.sleep(0.3)", "",
    ]
    body += [f"def test_shared_{i}(shared):\n    time.sleep(0.1)\n" for i in range(SHARED)]
    body += [f"def test_free_{i}():\n    time.sleep(0.1)\n" for i in range(SHARED)]
    (tmp_path / "test_sample.py").write_text("\n".join(body))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"{2 * SHARED} passed" in run.stdout, run.stdout[-2000:]
    pids = built.read_text().split()
    assert len(pids) == 1, f"the module fixture was built {len(pids)} times (by workers {pids})"
