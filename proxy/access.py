"""Who is calling and what they may do: API keys to tenants (or admin, or anonymous), and the route policy.

Keys come from `Authorization: Bearer <key>` (what the Ollama clients send when OLLAMA_API_KEY is set, and
the OpenAI SDK always) or `X-API-Key`. They are looked up by SHA-256 digest, so the lookup time reveals
nothing about a key, and never logged. Both headers are read: a tenant or admin key in either identifies
the caller (Authorization's first), so a placeholder in Authorization (the OpenAI SDK's `ollama`) does
not hide the tenant's key in X-API-Key. Every header that carries a key the proxy recognised is removed
before the request goes upstream: tenants' keys are the proxy's business, not the replica's (nor, for
a cloud model, ollama.com's).

Open mode: with no tenants and no admin keys configured the proxy is a transparent pass-through and
every route stays open, as Ollama itself is. As soon as either is configured, `/system/*` needs an admin
key and the model-management routes need an admin key or a tenant with `allow_management`.

Always open, whatever the configuration, to GET and HEAD (any other method there needs a key like any route,
and is then the proxy's 405, see proxy/ingress.py): `/healthz` and `/readyz` (load-balancer and kubelet
probes carry no key), unless `telemetry.metrics_auth` asks for the admin key `/metrics`; and a browser's
CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`: the Fetch standard sends it
without credentials, so refusing it keeps every browser client out; the replica answers it by its
OLLAMA_ORIGINS, and the request that follows needs its key as any other). Placeholder keys
(`anonymous.keys`, default `ollama`: the OpenAI SDK refuses to run without an api_key, so people pass one)
count as no key while anonymous access is allowed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import attrs

from .errors import Forbidden, Unauthorized
from .ollama import classify
from .schema import AnonymousConfig, TenantConfig

__all__ = ["ANONYMOUS", "INTERNAL_HEADER", "METRICS_PATH", "OPEN_METHODS", "PROBE_PATHS", "Identity",
           "Tenant", "TenantDirectory", "is_management", "is_preflight"]

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
"""Routes that never need a key: an orchestrator's probes must not depend on the keys."""
OPEN_METHODS = frozenset({"GET", "HEAD"})
"""The methods the proxy answers on its open routes. Any other method there is no probe: it needs a key
like any other request (and is then refused with 405 by the ingress)."""
METRICS_PATH = "/metrics"
INTERNAL_HEADER = "X-SOP-Internal"
"""Carries a plugin sub-request's credential (a per-process secret and the tenant it runs as); removed
before anything is forwarded, never logged."""


def is_management(method: str, path: str) -> bool:
    """Routes that change the replicas' model store (pull, push, create, copy, delete, blobs): the route
    table's `management` flag (proxy/ollama.py)."""
    return classify(method, path).management


@attrs.frozen
class Tenant:
    """A caller's limits, as the chain applies them (None = unlimited / use the chain default)."""

    name: str
    lane: str = "interactive"
    weight: float = 1.0
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    deadline_s: float | None = None
    max_prompt_tokens: int | None = None
    allow_management: bool = False
    anonymous: bool = False

    @classmethod
    def from_config(cls, config: TenantConfig) -> Tenant:
        return cls(config.name, config.lane, config.weight, config.requests_per_minute,
                   config.tokens_per_minute, config.max_concurrent, config.deadline_s,
                   config.max_prompt_tokens, config.allow_management)

    @classmethod
    def anonymous_from(cls, config: AnonymousConfig) -> Tenant:
        return cls("anonymous", "interactive", 1.0, config.requests_per_minute,
                   config.tokens_per_minute, config.max_concurrent, config.deadline_s,
                   config.max_prompt_tokens, False, anonymous=True)


ANONYMOUS = Tenant("anonymous", anonymous=True)


@attrs.frozen
class Identity:
    """The outcome of authentication for one request."""

    tenant: Tenant
    admin: bool = False
    key_headers: tuple[str, ...] = ()
    """The headers that carried a key the proxy recognised (removed before forwarding)."""
    internal: bool = False
    """A plugin's sub-request (proxy/plugin.py): runs the chain as `tenant`, and no plugin sees it."""


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method` (Fetch standard)."""
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _keys_from(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """(header, key) for every line of either header that carries a key, Authorization's first (every
    line: a key on a second line is a key too, and must not reach the replica). Empty values are no key
    (SDKs send `X-Api-Key:` with an empty api_key)."""
    getall = getattr(headers, "getall", None)
    keys = []
    for line in getall("Authorization", ()) if getall else [headers.get("Authorization", "")]:
        # The scheme, case-insensitive, then whitespace: RFC 9110 asks for one space, but a tab or
        # several must not turn a tenant's key into no key (anonymous, and the key relayed upstream).
        if line[:6].lower() == "bearer" and line[6:7] in (" ", "\t") and (key := line[7:].strip()):
            keys.append(("Authorization", key))
    for line in getall("X-API-Key", ()) if getall else [headers.get("X-API-Key", "")]:
        if key := line.strip():
            keys.append(("X-API-Key", key))
    return keys


class TenantDirectory:
    """Resolves requests to identities and applies the route policy."""

    def __init__(self, tenants: tuple[TenantConfig, ...], anonymous: AnonymousConfig,
                 admin_keys: tuple[str, ...], *, metrics_need_admin: bool = False,
                 internal: Callable[[str], str | None] | None = None) -> None:
        self.metrics_need_admin = metrics_need_admin
        self._internal = internal
        """Reads a sub-request credential: the tenant name it carries, or None when it is not ours."""
        self.reconfigure(tenants, anonymous, admin_keys)

    def reconfigure(self, tenants: tuple[TenantConfig, ...], anonymous: AnonymousConfig,
                    admin_keys: tuple[str, ...]) -> None:
        """Keys, tenants (with their quotas and lanes) and the anonymous policy, from a reload. Built
        aside and then bound, so a request sees either the old directory or the new one."""
        by_key = {_digest(k): Tenant.from_config(t) for t in tenants for k in t.keys}
        listed = [Tenant.from_config(t) for t in tenants]
        self._tenants = by_key
        self._admin = {_digest(k) for k in admin_keys}
        self._placeholders = {_digest(k) for k in anonymous.keys}
        self.tenants = listed
        self.anonymous_allowed = anonymous.allow
        self.anonymous = Tenant.anonymous_from(anonymous)
        self.open_mode = not tenants and not admin_keys
        self._by_name = {t.name: t for t in listed}

    def _open_route(self, path: str, method: str) -> bool:
        # Only the methods the proxy answers there itself: `POST /healthz` needs a key like any route
        # (then the ingress's 405), so a keyless caller learns nothing where anonymous access is refused.
        return method in OPEN_METHODS and (
            path in PROBE_PATHS or (path == METRICS_PATH and not self.metrics_need_admin))

    def identify(self, method: str, path: str, headers: Mapping[str, str]) -> Identity:
        """Who calls, and whether they may call this route; raises Unauthorized or Forbidden."""
        identity = self.authenticate(path, headers, method)
        self.authorize(identity, method, path, headers)
        return identity

    def authenticate(self, path: str, headers: Mapping[str, str], method: str = "") -> Identity:
        """Who calls (a tenant, admin, or anonymous); raises Unauthorized for an unknown key, or for no
        key where anonymous access is refused. Open routes (probes, /metrics unless protected) never
        refuse: an unknown key there is simply anonymous. A CORS preflight (`method` OPTIONS) without a
        key is anonymous too: it never carries one."""
        credential = headers.get(INTERNAL_HEADER)
        if credential is not None:
            return self._internal_identity(credential)
        keys = _keys_from(headers)
        caller: Identity | None = None
        recognised: list[str] = []
        placeholder = unknown = False
        for header, key in keys:
            digest = _digest(key)
            if (tenant := self._tenants.get(digest)) is not None:
                recognised.append(header)
                caller = caller or Identity(tenant)
            elif digest in self._admin:
                recognised.append(header)
                caller = caller or Identity(Tenant("admin"), admin=True)
            elif digest in self._placeholders and self.anonymous_allowed:
                recognised.append(header)
                placeholder = True
            else:
                unknown = True
        if caller is not None:
            return attrs.evolve(caller, key_headers=tuple(dict.fromkeys(recognised)))
        if placeholder:  # beside it, an unknown key is someone else's (forwarded), as with one header
            return Identity(self.anonymous, key_headers=tuple(dict.fromkeys(recognised)))
        if self.open_mode or self._open_route(path, method):
            return Identity(self.anonymous, key_headers=tuple(recognised))
        if unknown:
            raise Unauthorized("invalid API key")
        if (self.anonymous_allowed or path.startswith("/system/") or path == METRICS_PATH
                or is_preflight(method, headers)):
            return Identity(self.anonymous)
        raise Unauthorized("an API key is required (Authorization: Bearer <key>)")

    def _internal_identity(self, credential: str) -> Identity:
        name = self._internal(credential) if self._internal is not None else None
        if name is None:
            raise Unauthorized("invalid internal credential")
        tenant = self.anonymous if name == self.anonymous.name else self._by_name.get(name)
        if tenant is None:
            raise Unauthorized("a sub-request names an unknown tenant")
        return Identity(tenant, key_headers=(INTERNAL_HEADER,), internal=True)

    def authorize(self, identity: Identity, method: str, path: str, headers: Mapping[str, str]) -> None:
        """May `identity` call this route? Raises Unauthorized (anonymous) or Forbidden (a known caller
        whose role does not allow it)."""
        if self.open_mode or self._open_route(path, method):
            return
        if path == METRICS_PATH and not identity.admin:
            raise (Unauthorized("an admin API key is required") if identity.tenant.anonymous
                   else Forbidden("this route needs an admin API key"))
        if path == "/system/queue":
            if identity.tenant.anonymous:
                raise Unauthorized("an API key is required: a tenant's key shows its own requests in "
                                   "the queue, an admin key the whole queue")
            return  # a tenant may look at its own place in the queue
        if path.startswith("/system/") and not identity.admin:
            raise (Unauthorized("an admin API key is required") if identity.tenant.anonymous
                   else Forbidden("this route needs an admin API key"))
        if "X-Ollama-Replica" in headers and not identity.admin:
            raise Forbidden("naming a replica (X-Ollama-Replica) needs an admin API key")
        if is_management(method, path) and not (identity.admin or identity.tenant.allow_management):
            raise Forbidden(f"tenant {identity.tenant.name} may not manage models on this proxy")
