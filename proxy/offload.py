"""Work that grows with a request's body, off the event loop once the body is large.

Parsing, counting and cutting a prompt take time in proportion to its size: megabytes take a second,
which on the event loop would hold every other request of the process (one tenant's long chats,
everyone's latency). Above a size the work runs in a worker thread instead (the tokenizer releases
the GIL). Limits and the plugins that count prompts before it (trim_history, summarize_history,
embed_batch) use the same rule, from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .context import RequestContext

__all__ = ["OFFLOAD_BYTES", "PARSE_OFFLOAD_BYTES", "large", "off_loop", "parsed_json"]

OFFLOAD_BYTES = 16 * 1024
"""Bodies larger than this are counted (and cut) in a worker thread."""
PARSE_OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are parsed in a worker thread."""

T = TypeVar("T")


def large(ctx: RequestContext) -> bool:
    """Is `ctx`'s body large enough for its prompt to be counted off the event loop?"""
    return len(ctx.body or b"") > OFFLOAD_BYTES


async def off_loop(offload: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`: in a worker thread when `offload`, else here (a thread hop costs more than small
    work)."""
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)


async def parsed_json(ctx: RequestContext) -> Any:
    """`ctx.json()`, parsed in a worker thread when the body is over PARSE_OFFLOAD_BYTES (decoding a
    large body Go's way, when orjson refuses it, takes a while); the result is cached on the context, and
    a body parsed already costs no thread hop (every plugin and limits ask again)."""
    if not ctx.json_ready and len(ctx.body or b"") > PARSE_OFFLOAD_BYTES:
        await asyncio.to_thread(ctx.json)
    return ctx.json()
