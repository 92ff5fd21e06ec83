"""Failure detection for a pipeline: heartbeats and an abort record in the rendezvous store.

Point-to-point ops alone cannot tell "my neighbour is slow" from "my neighbour is hung", and when
a rank dies only its neighbours see the broken connection. So every rank bumps a heartbeat
counter in the store while it makes progress, watches the others' counters, and the first rank
that finds a stale one (or fails itself) records *who* failed under one key that every rank
polls. Everyone then exits with an error naming that rank, within ``timeout`` seconds.
Counters, not timestamps: ranks on different machines need not share a clock.
"""
from __future__ import annotations

import time
import torch.distributed as dist

ABORT_KEY = "fastdni/abort"


class PeerFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it."""


class Health:
    """Heartbeats of this rank and the watch over the others, through ``store``.

    Args:
        store: the process group's store (``TCPStore``), shared by all ranks.
        rank, world_size: this rank and the number of ranks.
        timeout: seconds without a heartbeat after which a rank counts as dead or hung; also the
            longest any wait on a peer may take.
        interval: seconds between heartbeats and between looks at the others.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, timeout: float, interval: float = 0.25):
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout, self.interval = float(timeout), min(float(interval), timeout / 4)
        self._beats = 0
        self._last_check = 0.0
        now = time.monotonic()
        self._seen = {r: (None, now) for r in range(world_size) if r != rank}  # rank -> (counter, local time it changed)
        self.beat(force=True)

    def restart_clocks(self) -> None:
        """Forget how long the others have been silent, e.g. after a barrier (no rank beats inside one)."""
        now = time.monotonic()
        self._seen = {r: (c, now) for r, (c, _) in self._seen.items()}

    def _key(self, rank: int) -> str:
        return f"fastdni/heartbeat/{rank}"

    def beat(self, force: bool = False) -> None:
        """Publish progress (at most every ``interval``) and check the others; raises :class:`PeerFailure`."""
        now = time.monotonic()
        if not force and now - self._last_check < self.interval:
            return
        self._last_check = now
        try:
            self._beats += 1
            self.store.set(self._key(self.rank), str(self._beats))
            self._check_abort()
            self._check_heartbeats(now)
        except PeerFailure:
            raise
        except Exception as err:  # the store itself is gone: its host (rank 0 or the launcher) died
            raise PeerFailure(f"rank {self.rank}: lost the rendezvous store (its host, rank 0 or the launcher, died?): {err}") from err

    def _check_abort(self) -> None:
        if self.store.check([ABORT_KEY]):
            raise PeerFailure(f"rank {self.rank}: aborting because {self.store.get(ABORT_KEY).decode()}")

    def _check_heartbeats(self, now: float) -> None:
        for rank, (last, since) in list(self._seen.items()):
            key = self._key(rank)
            # A rank that has not started yet has no key: its clock runs from our start.
            counter = self.store.get(key).decode() if self.store.check([key]) else None
            if counter == "done":
                continue
            if counter != last:
                self._seen[rank] = (counter, now)
            elif now - since > self.timeout:
                reason = f"rank {rank} died or hung (no heartbeat for {now - since:.1f}s, timeout {self.timeout:g}s)"
                self.abort(reason)
                raise PeerFailure(f"rank {self.rank}: {reason}")

    def mark_done(self) -> None:
        """This rank finished: a stopped heartbeat no longer means it failed."""
        self.store.set(self._key(self.rank), "done")

    def abort(self, reason: str) -> None:
        """Record the failure for all ranks (the first record wins); never raises."""
        try:
            self.store.compare_set(ABORT_KEY, "", reason)
        except Exception:
            pass

    def diagnose(self, error: str) -> PeerFailure:
        """A broken connection says which neighbour went away, not why: wait (up to ``timeout``) for
        the abort record or a stale heartbeat that names the rank that failed first."""
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        while time.monotonic() < deadline:
            try:
                self.beat(force=True)
            except PeerFailure as failure:
                return PeerFailure(f"{failure} (first seen as: {error})")
            time.sleep(self.interval)
        return PeerFailure(error)
