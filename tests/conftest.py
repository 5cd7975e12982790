"""Fixtures shared by the test modules.

`server`: a real server (tests/server_fixture.py), stopped with the check that it exits 0 and leaves no
process. A module picks its flags with a marker,
`pytestmark = pytest.mark.server_flags("--max-running-requests", "8", api_key="sk-...")`, and gets a server of
its own for its tests. Modules without one share one server with the test defaults for the whole session (a
start is seconds of CPU on the 2-core CI machine): each must leave it as it found it, so at its end the server
is idle with nothing held (reliability_util.leak_problems) and its cache is flushed for the next module. A
module that needs another kind of server defines its own `server` fixture.

`@pytest.mark.long`: a check too heavy for `make test`'s budget on the 2-core CI machine (a second
configuration of a check that `make test` keeps one fast instance of, or a soak). It runs where
RADIXSERVE_LONG=1, as `make reliability-long` sets; elsewhere it is skipped with that reason.

The tests' own torch work (HF references, models run in this process) waits between operators as a server's
worker does (launch/supervisor.py, docs/deploy.md): a short OpenMP spin, set here before anything loads libgomp.
libgomp's long default spin made HF's greedy decode ~5x slower where the servers the tests start share the
two cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from radixserve.launch.supervisor import short_spin_env

os.environ.update(short_spin_env())

import pytest
from reliability_util import LONG, flush_empties_pool, leak_problems, wait_idle
from server_fixture import RadixServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long check: runs under RADIXSERVE_LONG=1 (make reliability-long)")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_server() -> Iterator[RadixServer]:
    srv = RadixServer()
    yield srv
    srv.stop_cleanly()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[RadixServer]:
    marker = request.node.get_closest_marker("server_flags")
    if marker is None:
        srv = request.getfixturevalue("default_server")
        assert srv.proc.poll() is None, f"the shared server exited with code {srv.proc.returncode}:\n{srv.log()}"
        yield srv
        problems = leak_problems(wait_idle(srv, timeout=60))
        assert not problems, f"{request.node.name} left the shared server with {problems}"
        flush_empties_pool(srv)
        return
    srv = RadixServer(*marker.args, **marker.kwargs)
    yield srv
    srv.stop_cleanly()
