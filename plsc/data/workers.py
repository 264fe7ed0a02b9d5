"""Training batches built by worker processes straight into shared memory that lives as long as the loader.

Why not ``paddle.io.DataLoader``: it hands every batch over through a new shared-memory file, which the
worker fills and the main process maps afresh, page by page. Measured here with a data set that returns a
ready 64 x 3 x 112 x 112 batch (no work at all): 3.7 ms per batch with one worker, 58 us per image, more than
half of decoding the JPEG. Here each worker writes a batch's pixels and labels into a slot of shared mappings
made before the workers start (their pages fault once, in the first epoch). The main process copies the
labels and lends the slot's pixels as the batch tensor (``from_dlpack``: no copy on Paddle 3, a copy on 2.6);
the slot takes a new batch once no tensor uses its memory any more. Lending saves the main process a 2.4 MB
copy per 64-image batch (0.12 ms, a quarter of its share of the CPU the workers decode with). At most
``slots - workers`` slots are lent at a time, later batches are copied, so a caller that keeps batches
(``list(loader)``) gets intact ones and the workers always have slots to fill.

Hand-over: one pipe per worker, written directly by the sending process (``Connection.send``), carries the
tasks (slot, key) one way and a one-word reply per batch (``None``, or the error) the other way. Worker
``w`` builds batches ``w, w + k, w + 2k, ...`` of the epoch in order, so the reply to batch ``n`` is simply
the next one on worker ``n mod k``'s pipe: no reordering, and no feeder threads (``multiprocessing.Queue``
pickles and writes through a thread in each process: measured 0.6 ms per batch in the main process, 9 us per
image of the CPU the workers decode with).

Order and determinism: batches are yielded in the sampler's order, so the sequence of batches is the
in-process one (``num_workers=0``), whatever ``k``. Workers start with the first epoch and serve every later
one (no start-up per epoch; a new iteration ends the one before it, so two never share the slots); they
ignore SIGINT (the trainer handles it and saves), stop when the loader is closed or garbage-collected, and
exit by themselves if the main process dies. A worker's PlscError (an unreadable image, say) is raised
again in the main process with its one-line message; any other exception comes back with the worker's
traceback.

Linux only (the workers are forked, so the mappings and the data set need no pickling); with
``num_workers=0`` the same code runs in the main process.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import multiprocessing
import os
import signal
import traceback
import weakref
from collections.abc import Iterator

import cv2
import numpy as np
import paddle
from paddle.utils.dlpack import from_dlpack

from plsc.errors import PlscError

# Batches in flight per worker: one being built, one waiting to be taken.
PREFETCH_PER_WORKER = 2
# How often a waiting process checks that its peer is still alive, in seconds.
POLL_S = 1.0


class WorkerFailed(PlscError):
    """A loader worker raised a PlscError or died; the message says which and why."""


def _shared_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array in anonymous shared memory: forked workers inherit it; no /dev/shm file, so no size limit of
    a container's /dev/shm applies, and nothing is left behind if a process is killed."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)


def _fill_slots(batches, connection, images: np.ndarray, labels: np.ndarray, parent: int) -> None:
    """A worker's loop: build each requested batch into its slot and reply; exit on None, when the main
    process closes its end, or when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the trainer handles it
    # The fork inherited Paddle's SIGTERM handler, which prints a "FatalError" report to stdout; a worker is
    # terminated that way at exit (multiprocessing stops daemon processes so), and should just go. SIGTERM
    # was blocked across the fork (a SIGTERM sent before this line waits): default first, then unblock.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # One image at a time per worker (OpenCV's own threads would oversubscribe): the fork already gave this
    # process OpenCV's pool at one thread (_opencv_pool_stopped), so nothing here reconfigures it.
    while True:
        try:
            if not connection.poll(POLL_S):
                if os.getppid() != parent:
                    return
                continue
            task = connection.recv()
        except (EOFError, OSError):  # the main process closed the pipe
            return
        if task is None:
            return
        slot, key = task
        try:
            labels[slot] = batches.fill(key, images[slot])
            reply = None
        except PlscError as exc:
            reply = ("plsc", str(exc))
        except Exception:  # a bug: the main process raises it with this traceback
            reply = ("bug", traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the main process is gone
            return


@contextlib.contextmanager
def _opencv_pool_stopped():
    """OpenCV's thread pool at one thread (its workers joined) while processes are forked, then restored.

    A child forked while the pool's threads wait on its condition variables inherits those variables with
    waiters that do not exist in the child: OpenCV reconfiguring the pool there (cv2.setNumThreads) then
    waits in pthread_cond_destroy forever. Measured (OpenCV 4.14, pthreads backend, 2 threads): two children
    forked right after cv2.resize of a 1500 x 1500 image, each calling cv2.setNumThreads(1), hung in 11 of 200
    trials; with the pool stopped across the fork, in 0 of 200."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM held back in this thread, and so in a process forked meanwhile, which inherits the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class TrainLoader:
    """Iterates the sampler's current epoch as ``(images, labels)`` tensors: uint8 pixels in the model's
    layout and int64 labels, built by ``num_workers`` processes (0: in this process)."""

    def __init__(self, batches, sampler, num_workers: int):
        self.batches = batches  # plsc.data.transforms.TrainBatches
        self.sampler = sampler
        self.num_workers = num_workers
        self._workers: list[multiprocessing.Process] = []
        self._connections: list = []  # the main process's end of each worker's pipe
        self._images: np.ndarray | None = None  # [slots, B, ...] uint8
        self._labels: np.ndarray | None = None  # [slots, B] int64
        self._free_slots: collections.deque[int] = collections.deque()  # neither being built nor lent
        self._generation = 0  # of the slots: a lent slot coming back after close() is not reused
        self._epoch: Iterator | None = None  # the iteration using the slots

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[paddle.Tensor, paddle.Tensor]]:
        epoch = self.sampler.epoch
        keys = [(epoch, batch) for batch in self.sampler]
        if self.num_workers == 0:
            return self.batches.in_process(keys, self.sampler.batch_size)
        if self._epoch is not None:
            self._epoch.close()  # an earlier iteration still held somewhere: it lets go of the slots first
        self._start_workers()
        self._epoch = self._from_workers(keys)
        return self._epoch

    # --- workers ---

    def _start_workers(self) -> None:
        if self._workers:
            return
        count = PREFETCH_PER_WORKER * self.num_workers
        batch_size = self.sampler.batch_size
        self._images = _shared_array((count, batch_size, *self.batches.transform.pixel_shape), np.uint8)
        self._labels = _shared_array((count, batch_size), np.int64)
        self._free_slots = collections.deque(range(count))
        context = multiprocessing.get_context("fork")
        parent = os.getpid()
        with _opencv_pool_stopped():
            self._fork_workers(context, parent)

    def _fork_workers(self, context, parent: int) -> None:
        for worker in range(self.num_workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_fill_slots, args=(self.batches, theirs, self._images, self._labels, parent),
                name=f"plsc-loader-{worker}", daemon=True,
            )
            with _sigterm_blocked():  # until the worker has dropped Paddle's handler (see _fill_slots)
                process.start()
            theirs.close()  # the worker's end lives in the worker: its exit then reads as EOF here
            self._workers.append(process)
            self._connections.append(ours)

    def _from_workers(self, keys) -> Iterator[tuple[paddle.Tensor, paddle.Tensor]]:
        slot_of: dict[int, int] = {}  # batch sequence -> the slot it is built in
        submitted = received = 0  # batches handed to workers; replies read (always in batch order)

        def submit_while_free() -> int:
            sequence = submitted
            while sequence < len(keys) and self._free_slots:
                slot_of[sequence] = slot = self._free_slots.popleft()
                self._send(sequence % self.num_workers, (slot, keys[sequence]))
                sequence += 1
            return sequence

        try:
            while received < len(keys):
                submitted = submit_while_free()
                reply = self._reply(received)
                slot = slot_of.pop(received)
                received += 1
                if reply is not None:
                    self._free_slots.append(slot)
                    _raise_if_failed(reply)
                labels = paddle.to_tensor(self._labels[slot])
                images = self._hand_over(slot, in_flight=submitted - received)
                submitted = submit_while_free()
                yield images, labels
        finally:
            # An epoch left early (max_steps, a signal, an error): batches still being built would land in
            # slots that the next epoch hands out, so their replies are read first.
            try:
                while self._workers and received < submitted:
                    self._reply(received)
                    self._free_slots.append(slot_of.pop(received))
                    received += 1
            except WorkerFailed:  # a worker died meanwhile: close() stopped them all
                pass

    def _hand_over(self, slot: int, in_flight: int) -> paddle.Tensor:
        """The images of a filled slot as a tensor: lent (the tensor is the slot's memory, which returns to
        the pool once no tensor uses it any more), or copied when lending it would leave fewer than one slot
        per worker to build batches in, as when the caller keeps many batches (``list(loader)``)."""
        lent = len(self._images) - len(self._free_slots) - in_flight - 1  # besides this one
        if lent + 1 > len(self._images) - self.num_workers:
            images = paddle.to_tensor(self._images[slot])
            self._free_slots.append(slot)
            return images
        view = self._images[slot]  # a view of its own, which the tensor holds for as long as it lives
        weakref.finalize(view, self._return_slot, self._generation, slot)
        return from_dlpack(view.__dlpack__())

    def _return_slot(self, generation: int, slot: int) -> None:
        if generation == self._generation:  # not a slot of a mapping that close() has since let go
            self._free_slots.append(slot)

    def _send(self, worker: int, task) -> None:
        try:
            self._connections[worker].send(task)
        except OSError:  # its end closed (a broken pipe): the worker is gone
            self._worker_gone(worker)

    def _reply(self, sequence: int):
        """The reply to batch ``sequence`` (None once its slot is filled, or the worker's error)."""
        worker = sequence % self.num_workers
        connection = self._connections[worker]
        try:
            while not connection.poll(POLL_S):
                self._check_alive()
            return connection.recv()
        except (EOFError, OSError):  # its end closed: the worker is gone
            self._worker_gone(worker)

    def _worker_gone(self, worker: int) -> None:
        """Raise WorkerFailed for a worker whose pipe closed (with its exit code once it has exited)."""
        name = self._workers[worker].name
        self._workers[worker].join(timeout=POLL_S)
        self._check_alive()
        raise WorkerFailed(f"data loader worker {name} closed its pipe") from None

    def _check_alive(self) -> None:
        for process in self._workers:
            if not process.is_alive():
                code = process.exitcode
                self.close()
                message = f"data loader worker {process.name} exited unexpectedly (exit code {code})"
                raise WorkerFailed(message)

    def close(self) -> None:
        """Stop the workers (idempotent); the next epoch starts new ones."""
        workers, self._workers = self._workers, []
        connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
        for process in workers:
            process.join(timeout=POLL_S)
            if process.is_alive():
                process.terminate()
                process.join()
        for connection in connections:
            connection.close()
        # Tensors still lent keep their views, and so the mapping, alive; their slots are not taken back.
        self._images = self._labels = None
        self._free_slots = collections.deque()
        self._generation += 1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


def _raise_if_failed(reply) -> None:
    if reply is None:
        return
    kind, message = reply
    if kind == "plsc":
        raise WorkerFailed(message)
    raise RuntimeError(f"a data loader worker failed:\n{message}")
