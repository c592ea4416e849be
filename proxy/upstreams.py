"""Upstream replicas: their addresses and the set the forwarder picks from.

Round robin (weighted by `weight`) until the health and balancer steps take over the choice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import attrs
from yarl import URL

from .config import UpstreamConfig

__all__ = ["Upstream", "UpstreamSet"]


@attrs.define(eq=False)
class Upstream:
    """One Ollama replica as the proxy addresses it."""

    name: str
    url: URL
    num_parallel: int = 1
    weight: int = 1

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> Upstream:
        url = URL(config.url)
        return cls(name=config.name or f"{url.host}:{url.port}", url=url,
                   num_parallel=config.num_parallel, weight=config.weight)

    @property
    def host_header(self) -> str:
        """The `Host` to send: the replica's own address, which Ollama's loopback guard accepts."""
        host = self.url.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.url.port}" if self.url.explicit_port else host

    def target(self, path_qs: str) -> URL:
        """Absolute URL for a request path (+query), keeping any base path of the replica URL."""
        base = str(self.url).rstrip("/")
        return URL(base + path_qs, encoded=True)


class UpstreamSet:
    """The configured replicas, with a weighted round-robin cursor."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is required")
        self.upstreams = list(upstreams)
        order = [u for u in self.upstreams for _ in range(u.weight)]
        self._cycle: Iterator[Upstream] = itertools.cycle(order)

    @classmethod
    def from_config(cls, configs: Sequence[UpstreamConfig]) -> UpstreamSet:
        return cls([Upstream.from_config(c) for c in configs])

    def next(self) -> Upstream:
        """The next replica in weighted round-robin order."""
        return next(self._cycle)

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.upstreams)
