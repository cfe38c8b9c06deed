"""The tokenizer worker processes of ``gpt.prepare``: ``encoded(batches, workers)`` yields the tokens of
every batch in submission order, encoded by ``workers`` processes with at most ``IN_FLIGHT_PER_WORKER``
batches each in flight (bounded memory, byte-identical output whatever ``workers``).

Shutdown is the parent's: workers ignore SIGINT, die at once on SIGTERM, and what is left after a short
join is SIGKILLed; every wait is bounded or ends when a worker dies (``WorkerError`` names it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import wait

import numpy as np

from .tokenizer import EOT_ID, get_tokenizer

IN_FLIGHT_PER_WORKER = 2


def encode_batch(batch: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
    """Tokens of a batch of pieces, ``<|endoftext|>`` before each document start; and its UTF-8 bytes."""
    enc = get_tokenizer()
    texts = [t for t, _ in batch]
    parts = []
    for (_, starts), ids in zip(batch, map(enc.encode_ordinary, texts)):
        if starts:
            parts.append(np.array([EOT_ID], dtype=np.uint16))
        parts.append(np.asarray(ids, dtype=np.uint16))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), n_bytes


class WorkerError(RuntimeError):
    """A tokenizer worker failed or was killed (not bad input): the run stops, nothing written."""


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_CAN_MASK = hasattr(signal, "pthread_sigmask")
_JOIN_S = 0.5  # the most a shutdown waits for workers to end by themselves before SIGKILL
_KILL_S = 10.0  # the most it then waits for the killed workers to be gone (far less unless swapping)


def _worker(tasks, results, inherited) -> None:
    """A tokenizer process: ``(seq, batch)`` in, ``(seq, encode_batch(batch))`` out, until ``None`` or EOF.

    The parent owns shutdown: Ctrl-C (SIGINT to the process group) is ignored here, SIGTERM ends the
    process at once without running Python (no traceback), and the parent SIGKILLs what is left. Both
    signals are blocked from before the fork until these dispositions are set, so an early signal cannot
    raise inside start-up. Nothing is ever printed: a failure goes to the parent as one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    code = 0
    try:
        for conn in inherited:  # (fork) the other workers' and the parent's pipe ends: EOF must mean EOF
            conn.close()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        # A thread drains the task pipe at once, so the parent's send never waits on this process's
        # (possibly blocked) result send: no pipe deadlock whatever the batch sizes.
        threading.Thread(target=_receive, args=(tasks, inbox), daemon=True).start()
        get_tokenizer()
        while (task := inbox.get()) is not None:
            seq, batch = task
            results.send((seq, encode_batch(batch)))
    except OSError:  # the parent is gone (broken pipe): nothing to report to
        code = 1
    except BaseException as e:  # noqa: BLE001 - reported to the parent, never printed here
        code = 1
        try:
            results.send((-1, f"{type(e).__name__}: {e}"))
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)  # no atexit machinery, no traceback


def _receive(tasks, inbox) -> None:
    try:
        while True:
            task = tasks.recv()
            inbox.put(task)
            if task is None:
                return
    except EOFError:  # the parent closed the pipe or died
        inbox.put(None)
    except BaseException:  # noqa: BLE001 - a broken receiver must not leave the parent's send blocked
        os._exit(1)


class _Workers:
    """``workers`` tokenizer processes the parent manages itself (not ``multiprocessing.Pool``).

    Why not Pool: its workers shared locked queues and inherited this process's signal handlers, and its
    ``terminate()`` joins without a bound. Ctrl-C or SIGTERM raising inside a worker (a traceback), or a
    worker killed while holding a queue lock, could leave ``terminate()`` waiting forever (issue 22). Here
    each worker has its own two pipes (no shared lock), ignores Ctrl-C, dies silently on SIGTERM, and
    every wait of the parent is bounded or ends when a worker dies (its sentinel): shutdown is a short
    join, then SIGKILL, which cannot be caught or blocked."""

    def __init__(self, workers: int):
        # fork: cheap (no re-import of torch per worker); started before any thread or open file of the run
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.n, self.sent, self.taken = workers, 0, 0
        self.procs: list = []
        self.tasks: list = []
        self.results: list = []
        try:
            ends = []  # per worker: (task reader, result writer), the worker's own ends
            for _ in range(workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                result_r, result_w = ctx.Pipe(duplex=False)
                self.tasks.append(task_w)
                self.results.append(result_r)
                ends.append((task_r, result_w))
            every = [*self.tasks, *self.results, *(c for pair in ends for c in pair)]
            fork = ctx.get_start_method() == "fork"
            # While forking, Ctrl-C / SIGTERM are held back: blocked in this thread (the children inherit the
            # mask), and, on the main thread, their Python handlers replaced by one that only notes them. A
            # handler raising inside fork's at-fork hooks would be lost ("Exception ignored"), the run going
            # on; the noted signals are raised again below, once the handlers are back.
            deferred: list[int] = []
            saved = ({s: signal.signal(s, lambda signum, frame: deferred.append(signum)) for s in _STOP_SIGNALS}
                     if threading.current_thread() is threading.main_thread() else {})
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _CAN_MASK else None
            try:
                for task_r, result_w in ends:
                    inherited = [c for c in every if c is not task_r and c is not result_w] if fork else []
                    p = ctx.Process(target=_worker, args=(task_r, result_w, inherited), daemon=True,
                                    name=f"prepare-worker-{len(self.procs)}")
                    p.start()
                    self.procs.append(p)
            finally:
                for pair in ends:  # the workers' ends: only the workers hold them now
                    for c in pair:
                        c.close()
                for s, handler in saved.items():
                    signal.signal(s, handler)
                if old is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending Ctrl-C/SIGTERM raises now
                for s in dict.fromkeys(deferred):
                    signal.raise_signal(s)
        except BaseException:
            self.close(graceful=False)
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(graceful=exc_type is None)

    def _dead(self, i: int) -> WorkerError:
        p = self.procs[i]
        p.join(0.5)
        time.sleep(0.1)  # a SIGTERM/SIGINT sent to the whole group reaches this process's handler first
        code = p.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 and
               -code in signal.valid_signals() else f"ended (exit code {code})")
        return WorkerError(f"tokenizer worker {i} {how}; nothing written")

    def submit(self, batch) -> None:
        i = self.sent % self.n
        try:
            self.tasks[i].send((self.sent, batch))
        except OSError:
            raise self._dead(i) from None
        self.sent += 1

    def take(self) -> tuple[np.ndarray, int]:
        """The result of the oldest batch in flight: waits for it or for its worker's death, not longer."""
        i = self.taken % self.n
        conn, sentinel = self.results[i], self.procs[i].sentinel
        while not wait([conn, sentinel], timeout=1.0):
            pass
        try:
            seq, value = conn.recv()
        except (EOFError, OSError):
            raise self._dead(i) from None
        if seq != self.taken:
            raise WorkerError(f"tokenizer worker {i} failed: {value}" if seq == -1 else
                              f"tokenizer worker {i} returned batch {seq}, expected {self.taken}")
        self.taken += 1
        return value

    def map(self, batches) -> Iterator[tuple[np.ndarray, int]]:
        """``encode_batch`` over ``batches`` in order, at most ``IN_FLIGHT_PER_WORKER`` per worker ahead."""
        for batch in batches:
            self.submit(batch)
            if self.sent - self.taken >= IN_FLIGHT_PER_WORKER * self.n:
                yield self.take()
        while self.taken < self.sent:
            yield self.take()

    def close(self, graceful: bool = False) -> None:
        """End every worker, whatever state it is in, within ``_JOIN_S + _KILL_S`` seconds at most."""
        try:
            for conn in self.tasks:  # EOF ends an idle worker
                conn.close()
            deadline = time.monotonic() + (_JOIN_S if graceful else 0.0)
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:  # (even when a second Ctrl-C lands here)
            for p in self.procs:
                if p.exitcode is None:
                    p.kill()  # SIGKILL: cannot be caught, blocked or ignored
            deadline = time.monotonic() + _KILL_S
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
            for conn in self.results:
                conn.close()
            self.tasks, self.results = [], []


def encoded(batches, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """``encode_batch`` over ``batches`` in order, in ``workers`` processes, a bounded number in flight."""
    if workers == 1:
        yield from map(encode_batch, batches)
        return
    with _Workers(workers) as pool:
        yield from pool.map(batches)
