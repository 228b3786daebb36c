"""Reading ahead and writing behind on background threads while the model computes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

from geoseg_cli.inference.outputs import RowWriter

T = TypeVar("T")

#: Row blocks queued for the writer thread before the row-band loop waits for it.
WRITE_QUEUE = 4


class ReadAhead(Generic[T]):
    """Runs ``load(0)``, ``load(1)``, ... one step ahead on a background thread.

    GDAL, ONNX Runtime and numpy's large operations release the GIL, so the next row band
    is read while the current one is predicted. Use as a context manager.

    Args:
        load: Item index → item.
        count: Number of items.
    """

    def __init__(self, load: Callable[[int], T], count: int) -> None:
        self.load, self.count = load, count
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="geoseg-read")
        self._next: Future[T] | None = self._pool.submit(load, 0) if count else None
        self._index = 0

    def get(self, index: int) -> T:
        """Item ``index`` (0, 1, 2, ... in turn); the thread then starts on the next one."""
        if index != self._index or self._next is None:
            raise IndexError(f"read-ahead item {index} asked out of order")
        result = self._next.result()
        self._index += 1
        more = self._index < self.count
        self._next = self._pool.submit(self.load, self._index) if more else None
        return result

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=True)


class WriteBehind:
    """Hands finished rows to the output writers on a background thread.

    Arrays are handed over, not copied: the caller must not change them afterwards. An
    error on the thread is raised again by the next :meth:`write` or on leaving the
    ``with`` block; leaving without an error waits until everything is written.

    Args:
        writers: The row writers, the class map first.
    """

    def __init__(self, writers: Sequence[RowWriter]) -> None:
        self.writers = writers
        self._queue: queue.Queue[tuple[np.ndarray, ...] | None] = queue.Queue(WRITE_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="geoseg-write", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the main thread raises the first error
            valid, *outputs = item
            try:
                for writer, data in zip(self.writers, outputs, strict=True):
                    writer.write(data, valid)
            except BaseException as exc:  # raised again in the main thread
                self._error = exc

    def write(self, valid: np.ndarray, *outputs: np.ndarray) -> None:
        """Queue one block of rows per writer (``count×n×width``) and their valid mask."""
        self._raise()
        self._queue.put((valid, *outputs))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()
