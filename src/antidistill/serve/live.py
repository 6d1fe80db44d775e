"""Run the real server in a background thread on a loopback ephemeral port (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import build_server
from .config import ServeConfig
from .connections import uvicorn_kwargs


class LiveServer:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.app, self.engine = build_server(cfg)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=cfg.drain_s,
                                                    **uvicorn_kwargs(cfg.policy())))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            self.engine.stop()
            raise RuntimeError("server did not start within 30 s")
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.cfg.api_key or "none", max_retries=0,
                             timeout=120, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.cfg.drain_s + 10)
        self.engine.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
