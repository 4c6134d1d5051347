"""How `make test` keeps a file's shared fixture on one pytest-xdist worker (tests/conftest.py's
hook calls tag_groups; tests/test_suite_grouping.py checks that it takes effect)."""

from __future__ import annotations

import pytest


def tag_groups(config, items) -> None:
    """What a conftest's pytest_collection_modifyitems calls (tryfirst, before xdist reads the
    groups): under --dist loadgroup, the shared-fixture groups below."""
    if loadgroup(config):
        group_file_fixture_users(items)


def loadgroup(config) -> bool:
    """--dist loadgroup is on: the controller sees dist "loadgroup"; a worker sees dist "no" and
    option.loadgroup True (xdist's remote.setup_config)."""
    return getattr(config.option, "dist", "no") == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


def group_file_fixture_users(items) -> None:
    """The tests that share a module- or session-scoped fixture of their own file (a launched run,
    the namespaced cluster) go to one worker, so that fixture starts once; every other test goes to
    whichever worker is free. Fixtures of a conftest (Ray cluster, PostgreSQL, dataset) start once
    per worker anyway."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        defs = getattr(item, "_fixtureinfo", None)
        for chain in (defs.name2fixturedefs.values() if defs else ()):
            if chain[-1].scope != "function" and chain[-1].baseid.endswith(".py"):
                item.add_marker(pytest.mark.xdist_group(item.path.name))
                break
