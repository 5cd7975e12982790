"""radixserve: LLM serving with RadixAttention prefix caching, continuous batching and paged KV."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "ServerArgs", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import radixserve` (e.g. for the client) does not pull in torch.
    if name == "Engine":
        from radixserve.launch.engine import Engine
        return Engine
    if name == "ServerArgs":
        from radixserve.config import ServerArgs
        return ServerArgs
    raise AttributeError(name)
