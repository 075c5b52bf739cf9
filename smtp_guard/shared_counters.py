"""Rate-limit counters shared by the worker processes of one machine (``[smtp] workers = N``).

"A limit of 100/min is 100/min whatever N is": every worker takes from the same buckets, kept
in a file the supervisor creates and every worker maps (``mmap``, ``MAP_SHARED``). Nothing on
the hot path reads or writes a disk or a socket: a take is a lock, a few loads and stores in
shared memory, an unlock. The token-bucket rules are ``counters.py``'s (``take_from``,
``reserve_from``): this module only says where buckets live and makes each call atomic.

How the composition root uses it::

    # supervisor (app.py), before it starts the workers, in its private run directory on
    # tmpfs (on a disk-backed file the kernel also writes dirty pages back in the background)
    counters = SharedCounters.create(paths.counters, config.smtp.rate_limit_keys)
    ...start the workers, giving each the path (never the object)...
    # worker process, at start-up
    counters = SharedCounters.attach(paths.counters)   # then default_pipeline(..., counters=counters)
    # shutdown: every process ``counters.close()``; the supervisor removes the run directory

``create`` always makes a fresh table (written beside the path, then renamed over it, so an
attach never sees half a header); a worker restarted later attaches to the running table.
Each process attaches once and uses that object from one thread (the event loop). A child
forked from a process that holds an object gets a lock of its own at fork (``_after_fork``).
Every process passes ``now`` from the same clock (the policies' ``time.time``); a worker whose
``now`` is behind the latest one refills nothing, as when a clock steps back.

**The table**: open addressing with linear probing, ``2 x capacity`` slots of 32 bytes — the
64-bit hash of the key (``addresses.key_hash``, blake2b: stable across processes, unlike
``hash()``), tokens, updated, full-again time — after a 128-byte header (magic, sizes, count,
the sweep hand). Keys themselves are never stored: the file holds no address. Two keys with the
same 64-bit hash would share one bucket (both limited by their sum: too slow, never too fast);
among a million live keys the chance that any two collide is about 3e-8.

**The lock** is ``flock`` on the file around each call: two syscalls, about 1 µs uncontended
(``bench/shared_counters.py``), which ``take_all`` holds once for all its keys. The kernel drops
it when its holder dies, even by SIGKILL, so a killed worker never blocks the others; what a
worker killed inside a call leaves is at most one bucket half-written (tokens updated but not
its time, or a moved bucket present twice): counts slightly off, never a broken table. The
alternatives are worse: ``multiprocessing.Lock`` (a semaphore) is passed only by inheritance
and stays taken when its holder is killed; ``fcntl.lockf`` record locks cost ~40 % more and
are dropped when the process closes any descriptor of the file; a spin lock in the mapping
needs atomic instructions the standard library does not have. The server's ``settle`` never
blocks its event loop on the lock: a few tries, then polls, and after LOCK_WAIT (2 s) the
recipient is deferred with 451 4.3.5. A worker stopped while holding the lock would otherwise
have frozen every other worker's loop until it went on; the supervisor kills a worker whose
heartbeat stops (``workers.py``), and the kernel drops its lock.

**Capacity**: an idle bucket that is full again is the same as no bucket, and its slot is
reused. A new key takes a free slot — or one met on its probe chain whose bucket is full
again; past 7/8 of the capacity each new key also moves a sweep hand over the next 16 slots,
evicting buckets full again (backward-shift deletion: no tombstones), so the whole table is
swept once while its last eighth fills. When all ``capacity`` buckets are still refilling — a
slow rate over very many keys, or a capacity sized too small — a new key raises
``CountersFull``: nothing is taken, the pipeline defers the recipient with 451 4.3.5 and logs
the error, naming this file and what to raise; known keys go on being counted. A full table
refuses at once while no bucket can be full again yet (the header keeps a lower bound of every
full-again time); past that bound, the hand looks at up to 256 more slots before refusing
(~50 µs), so a refusal holds the lock for a bounded time and a full table of a million buckets
does not stall the other workers. The price: a bucket full again elsewhere in the table may
be found only by a later refusal's look (every one moves the hand on; a round of the table
takes 2 x capacity / 256 refusals, and ends with an exact bound).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

from .addresses import key_hash
from .counters import (Bucket, CountersFull, CountersUnavailable, Request, Settlement, Take, reserve_from, settle_on,
                       take_from)
from .file_lock import lock_polled, try_lock

_MAGIC = int.from_bytes(b"SGRATE01", "little")  # read back in native order: also an endianness check
_VERSION = 1

# Header, in 8-byte words (integers in the "q" view, floats in the "d" view of the same bytes).
_H_MAGIC, _H_VERSION, _H_CAPACITY, _H_SLOTS, _H_COUNT, _H_HAND, _H_REFUSED, _H_EVICTED = range(8)
_H_EARLIEST = 8  # a lower bound of every stored full-again time: nothing is evictable before it
_H_ROUND_MIN = 9  # the least full-again time in the slots the hand has passed in its current round
_HEADER_WORDS = 16  # 128 bytes, the rest reserved

# Slot i starts at word _HEADER_WORDS + 4 * i: key hash (q), tokens, updated, full_at (d).
_SLOT_WORDS = 4
_EMPTY = 0  # key hash of an empty slot; a key that hashes to 0 is stored as 1

_HIGH_WATER = 7 / 8  # above this share of the capacity, each new key moves the sweep hand ...
_STEP = 16  # ... over this many slots: 2 x capacity slots swept while the last eighth fills
_FULL_SCAN = 256  # slots the hand may look at for a new key when the table is full (~50 µs)
_HASH_CACHE = 4096  # key hashes remembered per process (blake2b would add ~0.7 µs per key)
LOCK_SPINS = 100  # tries for the lock, each after yielding the CPU, before polling it from the loop
LOCK_POLL = 0.001  # seconds between tries from then on
LOCK_WAIT = 2.0  # seconds a request waits for a lock held that long (its holder stopped): then 451


class SharedCounters:
    """``RateCounters`` in a shared-memory table: global across the processes that attach it.

    Build it with ``create`` (supervisor) or ``attach`` (worker), not directly.
    """

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._mmap = mapping
        self._table = _Table(mapping, path)
        this = weakref.ref(self)

        def after_fork() -> None:
            counters = this()
            if counters is not None:
                counters._after_fork()

        os.register_at_fork(after_in_child=after_fork)

    @classmethod
    def create(cls, path: Path | str, capacity: int) -> SharedCounters:
        """A new, empty table for ``capacity`` buckets at ``path`` (replacing any file there),
        private to this user (0600). The file takes ``64 x capacity`` bytes."""
        if not 1 <= capacity <= 1 << 30:
            raise ValueError(f"rate counters capacity must be between 1 and 2**30, not {capacity}")
        path = Path(path)
        slots = 2 * capacity
        size = 8 * (_HEADER_WORDS + _SLOT_WORDS * slots)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.new")
        fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, size)  # zeros: every slot empty
            # Reserve the pages now: a sparse file on a full tmpfs would fail only later, as a
            # SIGBUS in the middle of a rate-limit check. ENOSPC here is an error at start-up.
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            header = memoryview(mapping)[:8 * _HEADER_WORDS]  # released below: mmap.close needs it
            words, floats = header.cast("q"), header.cast("d")
            for word, value in ((_H_VERSION, _VERSION), (_H_CAPACITY, capacity), (_H_SLOTS, slots)):
                words[word] = value
            floats[_H_EARLIEST] = floats[_H_ROUND_MIN] = float("inf")
            words[_H_MAGIC] = _MAGIC  # last: a file with the magic is whole
            for view in (words, floats, header):
                view.release()
            os.replace(scratch, path)
        except BaseException:
            os.close(fd)
            scratch.unlink(missing_ok=True)
            raise
        return cls(path, fd, mapping)

    @classmethod
    def attach(cls, path: Path | str) -> SharedCounters:
        """The table the supervisor created at ``path``, as it is now."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < 8 * _HEADER_WORDS:
                raise ValueError(f"{path} is not a rate counters table ({size} bytes); "
                                 f"the supervisor creates it with SharedCounters.create")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(path, fd, mapping)
        except BaseException:
            mapping.close()
            os.close(fd)
            raise

    async def settle(self, request: Request, now: float) -> Settlement:
        # The flock is held for the whole request and never across an await.
        await self._lock()
        try:
            self._table.begin(now)
            try:
                return settle_on(self._table, request, now)
            finally:
                self._table.end()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    async def _lock(self) -> None:
        """Take the lock without blocking the event loop behind a holder that stopped.

        A holder keeps it for microseconds: a few tries, yielding the CPU in between, take it
        at once. Past them it is polled from the event loop, whose sessions and heartbeat go
        on; after LOCK_WAIT the request fails (``CountersUnavailable``: 451 4.3.5). A worker
        stopped (SIGSTOP) or stuck while holding it is killed by the supervisor for its silent
        heartbeat, and the kernel drops its lock. A blocking flock here had frozen every
        worker behind it instead."""
        for _ in range(LOCK_SPINS):
            if try_lock(self._fd):
                return
            os.sched_yield()
        if not await lock_polled(self._fd, LOCK_POLL, LOCK_POLL, LOCK_WAIT):
            raise CountersUnavailable(
                f"rate counters {self.path}: the table's lock was held for over {LOCK_WAIT:g}s "
                "(a worker stopped or stuck while holding it is killed when its heartbeat stops)")

    async def probe(self) -> str | None:
        return None

    # The same operations one at a time, synchronously (tests and benchmarks).

    def take(self, key: str, rate: float, burst: float, now: float, amount: int = 1) -> bool:
        return self.take_all((Take(key, rate, burst, amount),), now) is None

    def take_all(self, takes: Sequence[Take], now: float) -> Take | None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._table.begin(now)
            try:
                return take_from(self._table, takes, now)
            finally:
                self._table.end()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def schedule(self, key: str, rate: float, burst: float, now: float) -> float:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._table.begin(now)
            try:
                return reserve_from(self._table, key, rate, burst, now)
            finally:
                self._table.end()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def sweep(self, now: float) -> int:
        """Evict every bucket full again by ``now``; returns how many. One round of the whole
        table under the lock (~0.1 s for 200,000 slots in bench/shared_counters.py): new keys
        sweep as they go, this is for tests and for an operator who wants the room back now."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._table.begin(now)
            return self._table.sweep(now, self._table.slots)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def capacity(self) -> int:
        return self._table.capacity

    @property
    def refused(self) -> int:
        """New keys refused (``CountersFull``) since the table was created, by every process."""
        return self._table.header(_H_REFUSED)

    @property
    def evicted(self) -> int:
        """Buckets full again whose slot was given to another key, since the table was created."""
        return self._table.header(_H_EVICTED)

    def __len__(self) -> int:
        """Buckets in the table, including those full again whose slot is not reused yet."""
        return self._table.header(_H_COUNT)

    def __repr__(self) -> str:
        if self._mmap.closed:
            return f"<SharedCounters {self.path} closed>"
        return (f"<SharedCounters {self.path} buckets={len(self)}/{self.capacity} "
                f"evicted={self.evicted} refused={self.refused}>")

    def __getstate__(self) -> Any:
        raise TypeError("SharedCounters is not passed between processes: pass its path and call "
                        "SharedCounters.attach(path) in the worker")

    def close(self) -> None:
        """Unmap and close this process's view (the table stays for the others)."""
        if self._mmap.closed:
            return
        self._table.release()
        self._mmap.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SharedCounters:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_fork(self) -> None:
        # flock belongs to the open file description, which fork shares: without a fresh one
        # the parent and this child would not exclude each other. /proc/self/fd reopens the
        # very file this process maps, even if the path has been replaced since.
        if self._mmap.closed:
            return
        inherited = self._fd
        try:
            self._fd = os.open(f"/proc/self/fd/{inherited}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            self._fd = -1  # the next call fails (EBADF) rather than counting without a lock
        os.close(inherited)


class _Table:
    """The ``Buckets`` of one mapped file. Every method runs under the caller's lock."""

    def __init__(self, mapping: mmap.mmap, path: Path) -> None:
        view = memoryview(mapping)
        self._words = view.cast("q")
        self._floats = view.cast("d")
        view.release()
        words = self._words
        if words[_H_MAGIC] != _MAGIC or words[_H_VERSION] != _VERSION:
            self.release()
            raise ValueError(f"{path} is not a rate counters table of this version; the supervisor "
                             f"creates it with SharedCounters.create (restart the guard)")
        self.capacity = words[_H_CAPACITY]
        self.slots = words[_H_SLOTS]
        if len(words) != _HEADER_WORDS + _SLOT_WORDS * self.slots or self.slots != 2 * self.capacity:
            self.release()
            raise ValueError(f"{path}: rate counters table of the wrong size; restart the guard")
        self._path = path
        self._high_water = max(1, int(self.capacity * _HIGH_WATER))
        # Hashes of the keys of the current operation: their slots are neither reused nor
        # evicted until it ends, even if they are full again.
        self.pinned: set[int] = set()
        # New keys of the current operation not saved yet (a take_all that came up short).
        self._claimed: set[int] = set()
        self._now = 0.0
        self._hashes: dict[str, int] = {}

    def header(self, word: int) -> int:
        return self._words[word]

    def release(self) -> None:
        self._words.release()
        self._floats.release()

    def begin(self, now: float) -> None:
        self.pinned.clear()
        self._claimed.clear()
        self._now = now

    def end(self) -> None:
        # A new key claimed but not saved holds a full bucket, full again at ``now``. Only
        # then does ``now`` lower the bound: a claim that is saved has its true time, so a
        # table full of buckets still refilling refuses at once instead of looking around.
        if self._claimed:
            self._written(self._now, -1)  # counted as behind the hand, wherever they are

    # --- Buckets --------------------------------------------------------------------------

    def load(self, key: str, rate: float, burst: float, now: float) -> Bucket:
        h = self._hash(key)
        self.pinned.add(h)
        slot = self._find(h)
        if slot < 0:
            slot = self._claim(h, burst, now)
        w = _HEADER_WORDS + _SLOT_WORDS * slot
        floats = self._floats
        bucket = Bucket(floats[w + 1], floats[w + 2])
        bucket.refill(rate, burst, now)
        floats[w + 1] = bucket.tokens
        floats[w + 2] = bucket.updated
        return bucket

    def save(self, key: str, bucket: Bucket, rate: float, burst: float) -> None:
        # Probed again: a sweep for a later key of the same call may have moved this slot.
        h = self._hash(key)
        slot = self._find(h)
        if slot < 0:
            raise RuntimeError(f"rate counters: bucket {key!r} lost during its own operation")
        self._claimed.discard(h)
        w = _HEADER_WORDS + _SLOT_WORDS * slot
        full_at = bucket.full_at(rate, burst)
        floats = self._floats
        floats[w + 1] = bucket.tokens
        floats[w + 2] = bucket.updated
        floats[w + 3] = full_at
        self._written(full_at, slot)

    # --- slots ----------------------------------------------------------------------------

    def _hash(self, key: str) -> int:
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= _HASH_CACHE:
                self._hashes.clear()
            h = self._hashes[key] = key_hash(key) or 1
        return h

    def _find(self, h: int) -> int:
        """The slot holding ``h``, or -1."""
        words, slots = self._words, self.slots
        slot = h % slots
        while True:
            found = words[_HEADER_WORDS + _SLOT_WORDS * slot]
            if found == h:
                return slot
            if found == _EMPTY:
                return -1
            slot += 1
            if slot == slots:
                slot = 0

    def _claim(self, h: int, burst: float, now: float) -> int:
        """A slot for the new key ``h``, holding a full bucket; raises ``CountersFull``."""
        words, floats = self._words, self._floats
        # Before the lower bound of every full-again time, no bucket can be evicted: a table
        # full of buckets still refilling refuses without looking.
        if words[_H_COUNT] >= self._high_water and now >= floats[_H_EARLIEST]:
            self.sweep(now, _STEP)
        slot, reused = self._free_slot(h, now)
        if not reused and words[_H_COUNT] >= self.capacity:
            if now >= floats[_H_EARLIEST] and self.sweep(now, _FULL_SCAN):
                slot, reused = self._free_slot(h, now)
            if not reused and words[_H_COUNT] >= self.capacity:
                words[_H_REFUSED] += 1
                raise CountersFull(
                    f"rate counters full: all {self.capacity} buckets in {self._path} are still "
                    f"refilling, so a new key cannot be counted and its mail is deferred; "
                    f"raise [smtp] rate_limit_keys")
        if reused:
            words[_H_EVICTED] += 1
        else:
            words[_H_COUNT] += 1
        self._write(slot, h, burst, now, now)
        self._claimed.add(h)
        return slot

    def _free_slot(self, h: int, now: float) -> tuple[int, bool]:
        """Where the new key ``h`` goes: the first slot on its chain holding a bucket full
        again (reused: True), else the empty slot that ends the chain."""
        words, floats, slots = self._words, self._floats, self.slots
        slot = h % slots
        while True:
            w = _HEADER_WORDS + _SLOT_WORDS * slot
            found = words[w]
            if found == _EMPTY:
                return slot, False
            if floats[w + 3] <= now and found not in self.pinned:
                return slot, True
            slot += 1
            if slot == slots:
                slot = 0

    def _write(self, slot: int, h: int, tokens: float, updated: float, full_at: float) -> None:
        # Values before the key: a writer killed in between leaves an empty slot, or a bucket
        # full again holding other values — never a key with garbage.
        w = _HEADER_WORDS + _SLOT_WORDS * slot
        floats = self._floats
        floats[w + 1] = tokens
        floats[w + 2] = updated
        floats[w + 3] = full_at
        self._words[w] = h

    def _written(self, full_at: float, slot: int) -> None:
        floats = self._floats
        if full_at < floats[_H_EARLIEST]:
            floats[_H_EARLIEST] = full_at
        # A slot behind the hand counts for its round now; one ahead is looked at later.
        if slot < self._words[_H_HAND] and full_at < floats[_H_ROUND_MIN]:
            floats[_H_ROUND_MIN] = full_at

    def sweep(self, now: float, budget: int) -> int:
        """Move the hand over ``budget`` slots (at most one round), evicting buckets full
        again by ``now`` (not those of the current call); returns how many. A completed round
        makes the least full-again time the hand saw the new lower bound (``_H_EARLIEST``)."""
        words, floats, slots = self._words, self._floats, self.slots
        slot = words[_H_HAND]
        round_min = floats[_H_ROUND_MIN]
        evicted = 0
        for _ in range(min(budget, slots)):
            while True:
                w = _HEADER_WORDS + _SLOT_WORDS * slot
                found = words[w]
                if found == _EMPTY:
                    break
                full_at = floats[w + 3]
                if full_at > now or found in self.pinned:
                    round_min = min(round_min, full_at)
                    break
                # Evicted; another bucket may move into this slot: look at it again.
                self._delete(slot)
                evicted += 1
            slot += 1
            if slot == slots:
                slot = 0
                floats[_H_EARLIEST] = round_min
                round_min = float("inf")
        words[_H_HAND] = slot
        floats[_H_ROUND_MIN] = round_min
        words[_H_COUNT] -= evicted
        words[_H_EVICTED] += evicted
        return evicted

    def _delete(self, hole: int) -> None:
        """Empty ``hole`` and move later buckets of its cluster back, so that every chain
        stays unbroken (backward-shift deletion; no tombstones to accumulate). Buckets only
        move towards the sweep hand, so it misses none."""
        words, floats, slots = self._words, self._floats, self.slots
        slot = hole
        while True:
            slot += 1
            if slot == slots:
                slot = 0
            w = _HEADER_WORDS + _SLOT_WORDS * slot
            h = words[w]
            if h == _EMPTY:
                break
            home = h % slots
            if (hole - home) % slots < (slot - home) % slots:  # the hole is on its chain
                self._write(hole, h, floats[w + 1], floats[w + 2], floats[w + 3])
                hole = slot
        w = _HEADER_WORDS + _SLOT_WORDS * hole
        words[w] = _EMPTY
        floats[w + 1] = floats[w + 2] = floats[w + 3] = 0.0
