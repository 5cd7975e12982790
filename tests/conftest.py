"""Fixtures shared by the test modules.

`server`: one real server per module (tests/server_fixture.py), stopped at the module's end with the check that
it exits 0 and leaves no process. A module picks its flags with a marker,
`pytestmark = pytest.mark.server_flags("--max-running-requests", "8", api_key="sk-...")`; without one it gets
the test defaults. A module that needs another kind of server defines its own `server` fixture.

`@pytest.mark.long`: a check too heavy for `make test`'s budget on the 2-core CI machine (a second
configuration of a check that `make test` keeps one fast instance of, or a soak). It runs where
RADIXSERVE_LONG=1, as `make reliability-long` sets; elsewhere it is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from reliability_util import LONG
from server_fixture import RadixServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long check: runs under RADIXSERVE_LONG=1 (make reliability-long)")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[RadixServer]:
    marker = request.node.get_closest_marker("server_flags")
    srv = RadixServer(*marker.args, **marker.kwargs) if marker else RadixServer()
    yield srv
    srv.stop_cleanly()
