"""The daemon's writer thread: batches go to the store off the loop thread, and a batch's checkpoint is
saved only once the store acknowledged its rows."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from harvester import metrics
from harvester.checkpoint import Checkpoints, State
from harvester.coalesce import Coalescer
from harvester.sinks.base import Store, StoreError, flush

log = logging.getLogger(__name__)
BACKOFF_MAX = 5.0  # a store that comes back is written to within this many seconds
OUTAGE_REPEAT = 60.0  # while the store is down, say so again this often


@dataclass
class WriteJob:
    """What one write takes: the rows coalesced since the previous batch, and the checkpoint that
    becomes true once the store acknowledged them (an empty batch only moves the checkpoint)."""

    sink: Coalescer
    state: State
    read_at: list[float]  # monotonic read times of the blocks whose rows it holds


class Writer(threading.Thread):
    """Writes batches off the loop thread, one at a time: a store that is slow, locked or down never stops
    reading, the watchdog or /metrics. A failed batch keeps the rows the store did not take and is retried
    with backoff until it is stored, or the daemon stops (its checkpoint then stays unsaved: a replay)."""

    def __init__(self, store: Store, checkpoints: Checkpoints, wake: threading.Event) -> None:
        super().__init__(name="harvester-writer", daemon=True)
        self.store = store
        self.checkpoints = checkpoints
        self.wake = wake  # the loop's: set when a batch is done, so the next one is cut at once
        self.cond = threading.Condition()
        self.batch: WriteJob | None = None
        self.closing = False  # write what was handed over, then end
        self.abandon = threading.Event()  # end now, even with a batch unwritten
        self.store_up = True
        self.down_since = 0.0
        self.last_outage_log = 0.0
        self.backoff = 0.0
        self.newest_us = 0

    # -- the loop thread's side -------------------------------------------------------
    def idle(self) -> bool:
        return self.batch is None

    def in_flight(self) -> int:
        """Rows handed over and not yet acknowledged (with those a write has taken out of the batch)."""
        batch = self.batch
        return batch.sink.waiting() if batch is not None else 0

    def submit(self, batch: WriteJob) -> None:
        with self.cond:
            assert self.batch is None, "one batch at a time"
            self.batch = batch
            self.cond.notify_all()

    def finish(self, seconds: float) -> bool:
        """Write what was handed over within `seconds` (not retrying a store that is down), then end.
        Returns whether everything handed over was stored."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if not self.store_up:
            self.abandon.set()
        self.join(seconds)
        if self.is_alive():
            self.abandon.set()
            self.join(1.0)
        return self.batch is None

    # -- the writer thread -----------------------------------------------------------------
    def run(self) -> None:
        while not self.abandon.is_set():
            with self.cond:
                while self.batch is None and not self.closing:
                    self.cond.wait()
                batch = self.batch
            if batch is None:
                return
            if self._attempt(batch):
                with self.cond:
                    self.batch = None
                self.wake.set()
            elif self.abandon.wait(self.backoff):
                return

    def _attempt(self, batch: WriteJob) -> bool:
        waiting = len(batch.sink)
        if waiting:
            newest = batch.sink.newest()
            t = time.monotonic()
            try:
                written = flush(batch.sink, self.store)
            except Exception as e:  # StoreError, or anything unexpected: the rows stay, the daemon goes on
                if not isinstance(e, StoreError):
                    log.exception("unexpected error while writing to %s", self.store.url)
                self._failed(e, len(batch.sink))
                return False
            metrics.WRITE_SECONDS.observe(time.monotonic() - t)
            metrics.ROWS_WRITTEN.inc(written)
            self.newest_us = max(self.newest_us, newest)
            metrics.NEWEST.set(self.newest_us / 1e6)
        now = time.monotonic()
        for read_at in batch.read_at:
            metrics.DELAY.observe(now - read_at)
        if not self.store_up:
            log.warning("store %s is back after %.0f s; caught up %d rows", self.store.url,
                        now - self.down_since, waiting)
        self.store_up, self.backoff = True, 0.0
        metrics.STORE_UP.set(1)
        try:
            self.checkpoints.save(batch.state)
        except OSError as e:  # the rows are stored; the next batch's checkpoint covers these lines too
            log.error("%s: cannot save checkpoints: %s (they are saved again after the next write)",
                      self.checkpoints.path, e)
        return True

    def _failed(self, e: Exception, waiting: int) -> None:
        now = time.monotonic()
        metrics.WRITE_ERRORS.inc()
        metrics.STORE_UP.set(0)
        if self.store_up:
            log.error("store %s: %s; %d rows kept, checkpoints held, retrying with backoff", self.store.url, e,
                      waiting)
            self.store_up, self.down_since, self.last_outage_log = False, now, now
        elif now - self.last_outage_log >= OUTAGE_REPEAT:
            log.error("store %s still failing after %.0f s (%d rows in the batch being retried): %s",
                      self.store.url, now - self.down_since, waiting, e)
            self.last_outage_log = now
        metrics.RETRIES.inc()
        self.backoff = min(max(self.backoff * 2, 0.5), BACKOFF_MAX)
