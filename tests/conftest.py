"""Fixtures shared by the test modules.

`server`: one real server per module (tests/server_fixture.py), stopped at the module's end with the check that
it exits 0 and leaves no process. A module picks its flags with a marker,
`pytestmark = pytest.mark.server_flags("--max-running-requests", "8", api_key="sk-...")`; without one it gets
the test defaults. A module that needs another kind of server defines its own `server` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_fixture import RadixServer


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[RadixServer]:
    marker = request.node.get_closest_marker("server_flags")
    srv = RadixServer(*marker.args, **marker.kwargs) if marker else RadixServer()
    yield srv
    srv.stop_cleanly()
