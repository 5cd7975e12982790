"""The blocking face of the async client: a private event loop on a daemon thread."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from radixserve.client.errors import ClientError

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class LoopThread:
    """An event loop running on its own thread; `run()` blocks the calling thread for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="radixserve-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise ClientError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking client method was called on its own event loop; use the async client")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave the request running
            raise

    def iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        """Iterate an async generator from this thread; closing the iterator closes the generator."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(agen)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self.loop.is_closed():
                self.run(agen.aclose())

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


class Blocking(Protocol):
    _impl: Any
    _loop: LoopThread


def blocking(method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[Blocking, P], R]:
    """A blocking method that runs the async `method` of `self._impl` on `self._loop`."""

    @functools.wraps(method)
    def call(self: Blocking, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._impl, *args, **kwargs))

    return call


def iterating(
    method: Callable[Concatenate[Any, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Blocking, P], Iterator[T]]:
    """An iterator method over the async generator `method` of `self._impl`, stepped on `self._loop`."""

    @functools.wraps(method)
    def call(self: Blocking, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return self._loop.iterate(method(self._impl, *args, **kwargs))

    return call
