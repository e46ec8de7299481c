"""One process-wide pool of worker threads for calls that release the GIL (the native kernels, pread).

concurrent.futures would do, but it imports logging and more: ~3 ms of every quantize process's start-up,
which is visible on a job that lasts a tenth of a second. This is the little that ggufkit needs: submit a
call, wait for its result or exception; workers are daemon threads started on demand and kept. A call
nobody has started yet when its result is wanted runs on the waiting thread, so a call running on the pool
may itself submit calls and wait for them without deadlock.
"""

from __future__ import annotations

import threading
from _queue import SimpleQueue


class Task:
    """The outcome of one submitted call."""

    __slots__ = ("_call", "_claimed", "_finished", "_result", "_error")

    def __init__(self, call):
        self._call = call
        self._claimed = threading.Lock()  # taken by the one thread that runs the call
        self._finished = threading.Lock()
        self._finished.acquire()  # released when the call has returned or raised
        self._result = self._error = None

    def _run(self) -> None:
        if not self._claimed.acquire(blocking=False):
            return
        try:
            self._result = self._call()
        except BaseException as e:  # noqa: BLE001  (handed to whoever waits for the result)
            self._error = e
        finally:
            self._call = None
            self._finished.release()

    def done(self) -> bool:
        return not self._finished.locked()

    def wait(self) -> BaseException | None:
        """Wait for the call to finish (running it here if no worker has started it); its exception, if it
        raised one."""
        self._run()
        with self._finished:
            pass
        return self._error

    def result(self):
        """Wait for the call; its return value (or raise its exception)."""
        if self.wait() is not None:
            raise self._error
        return self._result


class Pool:
    def __init__(self, name: str):
        self._name = name
        self._queue: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        self._workers = 0

    def reserve(self, n: int) -> None:
        """Make sure n workers exist (they start now, and stay)."""
        with self._lock:
            while self._workers < n:
                self._workers += 1
                name = f"{self._name}-{self._workers}"
                threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, call) -> Task:
        task = Task(call)
        self._queue.put(task)
        return task

    def _work(self) -> None:
        while True:
            self._queue.get()._run()


_pool = Pool("ggufkit-worker")


def pool(workers: int) -> Pool:
    """The process's pool, with at least `workers` threads."""
    _pool.reserve(workers)
    return _pool
