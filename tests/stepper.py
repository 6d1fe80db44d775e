"""Hold the embedded engine's worker at a known step, instead of assuming how fast a token is."""

from __future__ import annotations

import threading
import time


def wait_for(cond, timeout: float = 60.0) -> bool:
    """Poll ``cond`` until it holds; the timeout only bounds a hang, it is never a speed assumption."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Stepper:
    """Installed as ``engine.before_step``: the worker may take ``budget`` more decode steps, then
    waits until :meth:`allow` or :meth:`release`. Use as a context manager: leaving releases the
    worker and uninstalls the hook.

    Example:
        >>> with Stepper(engine, budget=5) as st:   # doctest: +SKIP
        ...     st.wait_held()                      # exactly 5 steps were taken, the worker is parked
    """

    def __init__(self, engine, budget: int = 0):
        self.engine, self.budget, self.free, self.parked = engine, budget, False, False
        self.cv = threading.Condition()
        engine.before_step = self

    def __call__(self, _engine) -> None:
        with self.cv:
            while not self.free and self.budget <= 0:
                self.parked = True
                self.cv.notify_all()
                self.cv.wait()
            self.parked = False
            self.budget -= 1

    def allow(self, n: int) -> None:
        with self.cv:
            self.budget += n
            self.cv.notify_all()

    def wait_held(self, timeout: float = 60.0) -> bool:
        """Wait until the worker is parked with no budget left."""
        with self.cv:
            return self.cv.wait_for(lambda: self.parked and self.budget <= 0, timeout)

    def release(self) -> None:
        with self.cv:
            self.free = True
            self.cv.notify_all()
        self.engine.before_step = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def client_left(engine) -> bool:
    """The server has seen every running request's client go away (queued ones leave at once)."""
    return all(lv.req.cancelled.is_set() for lv in list(engine._running.values()))
