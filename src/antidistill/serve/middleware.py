"""Pure ASGI middleware: a body-size cap and client-disconnect detection, for every request.

Not ``@app.middleware("http")``: that is Starlette's ``BaseHTTPMiddleware``, under which a
handler's ``request.is_disconnected()`` never turns true, so a non-streaming request whose
client left would run to the end.

:class:`RequestGuard`

* answers 413 (OpenAI-format JSON) to a ``Content-Length`` above the cap before reading any of the
  body, and to a chunked body as soon as it passes the cap;
* answers 408 to a body that has not fully arrived ``body_timeout_s`` after the request began (a
  slowloris trickle would otherwise hold its connection, and a slot of uvicorn's connection limit,
  forever; the body is read before auth, so this needs no key);
* reads the (bounded) body once and replays it to the app;
* then watches the connection: one task waits for ``http.disconnect`` and sets the
  ``asyncio.Event`` at ``scope["antidistill.disconnected"]``, which handlers await next to their
  results. The app's own ``receive`` calls see the disconnect too.
"""

from __future__ import annotations

import asyncio
import json

from .errors import error_body

DISCONNECTED = "antidistill.disconnected"


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = 10.0):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(413, f"request body is larger than {self.max_body_bytes} bytes")
        close = [(b"connection", b"close")]  # the unread rest of the body makes the connection unusable
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await send_json(send, 400, error_body(400, "invalid Content-Length"), close)
            if n > self.max_body_bytes:
                return await send_json(send, 413, too_big, close)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        return await send_json(send, 413, too_big, close)
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            slow = error_body(408, f"the request body did not arrive within {self.body_timeout_s:g} s")
            return await send_json(send, 408, slow, close)

        disconnected = asyncio.Event()
        scope[DISCONNECTED] = disconnected

        async def watch():
            while True:
                m = await receive()
                if m["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.create_task(watch())
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()


class RequestLimit:
    """Pure ASGI middleware: at most ``max_requests`` HTTP requests in flight; beyond, an OpenAI-format JSON
    503 with ``Retry-After``. ``/health`` is never refused, so a full server still says it is alive.

    This replaces uvicorn's ``limit_concurrency``, which counts idle connections too and answers ``text/plain``.
    """

    def __init__(self, app, max_requests: int, retry_after_s: int = 1, exempt: frozenset = frozenset({"/health"})):
        self.app, self.max_requests, self.retry_after_s, self.exempt = app, int(max_requests), int(retry_after_s), exempt
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            body = error_body(503, "the server is at capacity; retry later", code="server_busy")
            return await send_json(send, 503, body, [(b"retry-after", str(self.retry_after_s).encode())])
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
