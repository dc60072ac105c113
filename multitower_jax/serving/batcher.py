"""A micro-batcher: concurrent callers' items are grouped into one batch call.

    batcher = MicroBatcher(lambda items: [answer(i) for i in ...], max_batch_size=16, max_wait_s=0.002)
    result = batcher(item)            # blocks; or batcher.submit(item) -> Future

One worker thread takes the first waiting item, then keeps collecting until the batch has
`max_batch_size` items or `max_wait_s` has passed since that first item, calls `fn(items)` once
and hands result i to caller i. Under load batches fill up (throughput); when idle a lone request
waits at most `max_wait_s` (latency).

Errors: a result that is an exception instance (`fn` may return one in place of an item's result,
like `asyncio.gather(return_exceptions=True)`) is raised to that item's caller only; an exception
raised by `fn` itself goes to every caller of that batch. `submit` after `close()` raises; items
queued before `close()` are still served, and any left when the worker stops fail.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class BatcherClosedError(RuntimeError):
    """The micro-batcher was closed: it takes no new items."""


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], Sequence[R | BaseException]], max_batch_size: int,
                 max_wait_s: float, name: str = "micro-batcher"):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"MicroBatcher: need max_batch_size >= 1 and max_wait_s >= 0, "
                             f"got {max_batch_size}, {max_wait_s}")
        self.fn, self.max_batch_size, self.max_wait_s = fn, int(max_batch_size), float(max_wait_s)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Held while checking `_closed` and enqueueing, so no item can land behind the stop marker.
        self._lock = threading.Lock()
        self._closed = False
        self.batch_sizes: list[int] = []  # one entry per batch call (for benchmarks and tests)
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError("MicroBatcher is closed")
            self._queue.put((item, future))
        return future

    def __call__(self, item: T) -> R:
        return self.submit(item).result()

    def close(self) -> None:
        """Serve the queued items, then stop the worker (later `submit`s raise)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                deadline = time.perf_counter() + self.max_wait_s
                while len(batch) < self.max_batch_size:
                    timeout = deadline - time.perf_counter()
                    try:
                        entry = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if entry is _STOP:
                        stop = True
                        break
                    batch.append(entry)
                self._dispatch(batch)
        finally:  # however the worker ends, nobody is left waiting on a future it will never set
            with self._lock:
                self._closed = True
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP:
                _, future = entry
                if future.set_running_or_notify_cancel():
                    future.set_exception(BatcherClosedError("MicroBatcher closed before serving this item"))

    def _dispatch(self, batch: list[tuple[T, Future[R]]]) -> None:
        batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]  # drop cancelled callers
        if not batch:
            return
        items = [item for item, _ in batch]
        self.batch_sizes.append(len(items))
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
