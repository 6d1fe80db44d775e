"""Connection limits at the HTTP protocol: idle or slow connections cannot lock keyed clients out.

uvicorn's own ``limit_concurrency`` counts open connections, idle ones included, and answers 503
``text/plain`` to everything past it, ``/health`` too: 170 idle sockets with no key and no bytes
took the service away. uvicorn stays (its h11 protocol, keep-alive timeout and incomplete-event
cap do the HTTP work); this module adds what it lacks, as a subclass of its h11 protocol:

- **header timeout**: a connection whose next request's headers are not complete
  ``header_timeout_s`` after it opened (or after its last response) gets a JSON 408 and is closed.
  uvicorn has no such timeout, so a header slowloris held its connection forever;
- **idle keep-alive**: uvicorn's ``timeout_keep_alive`` (``keep_alive_s``);
- **connection caps with eviction**: at ``max_connections_per_client`` connections from one client
  address, or ``max_connections`` in all, a new connection closes the oldest *idle* one (no request
  in progress: waiting for headers, or kept alive). Only when every connection is busy with a request
  is the new one answered a JSON 503 in OpenAI's format with ``Retry-After``. So a client that
  connects and sends a request is served, however many idle sockets others hold;
- requests in flight are limited by :class:`~antidistill.serve.middleware.RequestLimit` (JSON 503,
  ``/health`` exempt), not by connections.

:func:`guarded_protocol` builds the protocol class for one server; both ``antidistill serve`` engines
use it (vLLM's through :func:`install_for_vllm`).
"""

from __future__ import annotations

import collections
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..serving_policy import ServingPolicy
from .errors import error_body


def raw_json_response(status: int, reason: str, body: dict, headers: dict | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(data)}",
            "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class _Registry:
    """Open connections of one server, oldest first, overall and per client address."""

    def __init__(self):
        self.all: collections.OrderedDict = collections.OrderedDict()
        self.by_client: dict[str, collections.OrderedDict] = collections.defaultdict(collections.OrderedDict)
        self.stats = collections.Counter()

    def add(self, proto) -> None:
        self.all[proto] = None
        self.by_client[proto.client_key][proto] = None

    def remove(self, proto) -> None:
        self.all.pop(proto, None)
        group = self.by_client.get(proto.client_key)
        if group is not None:
            group.pop(proto, None)
            if not group:
                del self.by_client[proto.client_key]


def guarded_protocol(policy: ServingPolicy) -> type:
    """A uvicorn h11 protocol class enforcing ``policy``'s connection limits (one registry per call)."""
    registry = _Registry()

    class GuardedH11Protocol(H11Protocol):
        connections_registry = registry

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.client_key = self.client[0] if self.client else "?"
            self._header_timer = None
            registry.add(self)
            if not (self._make_room(registry.by_client[self.client_key], policy.max_connections_per_client)
                    and self._make_room(registry.all, policy.max_connections)):
                registry.stats["refused"] += 1
                body = error_body(503, "the server has too many open connections; retry later",
                                  code="too_many_connections")
                transport.write(raw_json_response(503, "Service Unavailable", body,
                                                  {"retry-after": str(policy.retry_after_s)}))
                transport.close()
                return
            self._arm_header_timer()

        def _make_room(self, group, cap: int) -> bool:
            """Close the oldest idle connections of ``group`` until it holds at most ``cap``; False if it cannot."""
            while len(group) > cap:
                victim = next((p for p in group if p is not self and p.idle), None)
                if victim is None:
                    registry.remove(self)
                    return False
                registry.stats["evicted"] += 1
                victim.close_idle()
            return True

        @property
        def idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def close_idle(self) -> None:
            registry.remove(self)
            if not self.transport.is_closing():
                self.transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(policy.header_timeout_s, self._header_timeout, self.cycle)

        def _header_timeout(self, cycle_then) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not cycle_then or not self.idle:
                return  # a request began since: its headers arrived in time
            registry.stats["header_timeouts"] += 1
            registry.remove(self)
            body = error_body(408, f"the request headers did not arrive within {policy.header_timeout_s:g} s")
            self.transport.write(raw_json_response(408, "Request Timeout", body))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            registry.remove(self)
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_kwargs(policy: ServingPolicy) -> dict:
    """uvicorn.Config arguments for ``policy``: the guarded h11 protocol and the keep-alive timeout.
    No ``limit_concurrency``: it counts idle connections and answers ``text/plain``."""
    return {"http": guarded_protocol(policy), "timeout_keep_alive": policy.keep_alive_s,
            "h11_max_incomplete_event_size": 16 * 1024}
