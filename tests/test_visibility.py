"""The storage check every multi-node group passes before training, with nodes played by
functions that see different filesystems (the real multi-node version: tests/test_multinode.py)."""

from __future__ import annotations

import pytest

from common.errors import UserError
from orchestrator import visibility


def nodes_with_disks(tmp_path, names):
    """run_on for nodes whose "local" paths are private: node n sees tmp_path/n as /shared."""

    def run_on(node, fn, *args):
        args = [str(tmp_path / node / "ckpt") if a == "LOCAL" else a for a in args]
        return fn(*args)

    for n in names:
        (tmp_path / n).mkdir()
    return run_on


def test_a_node_local_checkpoint_path_is_refused_naming_the_blind_nodes(tmp_path):
    run_on = nodes_with_disks(tmp_path, ["aaaa1111", "bbbb2222", "cccc3333"])
    with pytest.raises(UserError) as e:
        visibility.check(run_on, ["aaaa1111", "bbbb2222", "cccc3333"], checkpoint_uri="LOCAL", checkpoint_options={},
                         data_uri=None, data_options={})
    msg = str(e.value)
    assert "bbbb2222, cccc3333 cannot read" in msg and "written there by node aaaa1111" in msg
    assert "object store" in msg
    assert not list((tmp_path / "aaaa1111" / "ckpt").iterdir())  # the marker is cleaned up


def test_a_shared_location_passes_and_leaves_nothing_behind(tmp_path):
    shared = tmp_path / "shared"
    calls = []

    def run_on(node, fn, *args):
        calls.append((node, fn.__name__))
        return fn(*args)

    visibility.check(run_on, ["n1", "n2"], checkpoint_uri=str(shared), checkpoint_options={}, data_uri=None,
                     data_options={})
    assert ("n2", "read_marker") in calls and not list(shared.iterdir())


def test_one_node_needs_no_check(tmp_path):
    visibility.check(lambda *a: pytest.fail("no call expected"), ["n1"], checkpoint_uri="x", checkpoint_options={},
                     data_uri=None, data_options={})


def test_a_dataset_some_node_cannot_read_is_refused(tmp_path, tiny_data):
    def run_on(node, fn, *args):
        if fn is visibility.read_index and node == "n2":
            return fn(str(tmp_path / "missing"), {})
        return fn(*args)

    with pytest.raises(UserError, match=r"data.uri=.*node\(s\) n2 cannot read the dataset"):
        visibility.check(run_on, ["n1", "n2"], checkpoint_uri=str(tmp_path / "c"), checkpoint_options={},
                         data_uri=tiny_data, data_options={})
