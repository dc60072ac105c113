"""A micro-batcher: concurrent callers' items are grouped into one batch call.

    batcher = MicroBatcher(lambda items: [answer(i) for i in ...], max_batch_size=16, max_wait_s=0.002)
    result = batcher(item)            # blocks; or batcher.submit(item) -> Future

A lone caller of `batcher(item)` (nothing queued, no batch running) runs the batch call of its one
item on its own thread: an idle server neither waits for company nor hands the request to another
thread and back (two thread wake-ups, ~0.4 ms on a 2-core machine). Otherwise the item is queued:
one worker thread takes the first waiting item together with every item already queued behind
it, and a lone one is dispatched at once. When other items were queued, the worker keeps collecting until the batch has
`max_batch_size` items or `max_wait_s` has passed since it took the first, then calls `fn(items)`
once and hands result i to caller i. Under load batches fill up (throughput: requests arriving
while `fn` runs queue up and form the next batch); a lone request pays no wait (latency).

`paused()` holds the worker (it takes at most one item and does not dispatch it), so a test or a
caller can queue a known group and have it served as one batch. `wait_seconds` records, per
batch, how long its first item waited between `submit` and the call of `fn` (queueing plus the
fill wait; `bench serve` reports it).

Errors: a result that is an exception instance (`fn` may return one in place of an item's result,
like `asyncio.gather(return_exceptions=True)`) is raised to that item's caller only; an exception
raised by `fn` itself goes to every caller of that batch. `submit` after `close()` raises; items
queued before `close()` are still served, and any left when the worker stops fail.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
        self.wait_seconds: list[float] = []  # per batch call: its first item's submit -> fn
        self._running = threading.Event()  # cleared while paused()
        self._running.set()
        self._dispatching = threading.Lock()  # held by whoever runs `fn`: the worker or a lone caller
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError("MicroBatcher is closed")
            self._queue.put((item, future, time.perf_counter()))
        return future

    def __call__(self, item: T) -> R:
        if self._running.is_set() and self._queue.empty() and self._dispatching.acquire(blocking=False):
            try:
                if self._queue.empty() and not self._closed:  # still alone: answer on this thread
                    return self._call_alone(item)
            finally:
                self._dispatching.release()
        return self.submit(item).result()

    def _call_alone(self, item: T) -> R:
        future: Future[R] = Future()
        self._dispatch([(item, future, time.perf_counter())])  # a batch of one, on this thread
        return future.result()

    def close(self) -> None:
        """Serve the queued items, then stop the worker (later `submit`s raise)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._running.set()  # a paused worker must reach the stop marker
        if threading.current_thread() is not self._worker:
            self._worker.join()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold dispatching inside the block; items submitted meanwhile are served together after it
        (up to `max_batch_size` per batch)."""
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

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
                self._running.wait()
                with self._dispatching:  # (a lone caller may be answering itself meanwhile)
                    batch = [first]
                    # Everything already queued joins at once; waiting for more only pays when
                    # others are queued (load): a lone request is dispatched without delay.
                    stop = self._collect(batch, block=False)
                    if not stop and 1 < len(batch) < self.max_batch_size and self.max_wait_s > 0:
                        stop = self._collect(batch, block=True)
                    self._dispatch(batch)
        finally:  # however the worker ends, nobody is left waiting on a future it will never set
            with self._lock:
                self._closed = True
            self._fail_pending()

    def _collect(self, batch: list[Any], block: bool) -> bool:
        """Append queued items to `batch` up to `max_batch_size`: those already queued, or (`block`)
        those arriving until `max_wait_s` after now. True when the stop marker was met."""
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                if block:
                    timeout = deadline - time.perf_counter()
                    if timeout <= 0:
                        return False
                    entry = self._queue.get(timeout=timeout)
                else:
                    entry = self._queue.get_nowait()
            except queue.Empty:
                return False
            if entry is _STOP:
                return True
            batch.append(entry)
        return False

    def _fail_pending(self) -> None:
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not _STOP:
                future = entry[1]
                if future.set_running_or_notify_cancel():
                    future.set_exception(BatcherClosedError("MicroBatcher closed before serving this item"))

    def _dispatch(self, entries: list[tuple[T, Future[R], float]]) -> None:
        first_submitted = entries[0][2]
        batch = [(item, f) for item, f, _ in entries if f.set_running_or_notify_cancel()]  # drop cancelled callers
        if not batch:
            return
        items = [item for item, _ in batch]
        self.batch_sizes.append(len(items))
        self.wait_seconds.append(time.perf_counter() - first_submitted)
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
