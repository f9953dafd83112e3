"""The worker loop's read-ahead across epochs (no Ray needed: it only iterates)."""

import threading
import time

import pytest

from biovita.train.loop import epoch_batches


def test_yields_every_epoch_in_order_and_reads_ahead_across_epoch_ends():
    started = []

    def batches_of(e):
        started.append(e)
        return iter([f"{e}-{i}" for i in range(3)])

    it = epoch_batches(1, 4, batches_of, depth=4)
    first = next(it)
    time.sleep(0.2)  # the reader thread fills the queue meanwhile
    assert first == (1, 0, "1-0")
    assert started == [1, 2]  # epoch 2 started while epoch 1 was still being consumed
    rest = list(it)
    assert [first, *rest] == [(e, i, f"{e}-{i}") for e in range(1, 4) for i in range(3)]


def test_reader_errors_reach_the_training_thread():
    def batches_of(e):
        if e == 1:
            raise RuntimeError("shard 1 is broken")
        return iter(["x"])

    with pytest.raises(RuntimeError, match="shard 1 is broken"):
        list(epoch_batches(0, 3, batches_of, depth=2))


def test_stopping_early_leaves_no_reader_blocked():
    def batches_of(e):
        return iter(range(1000))

    it = epoch_batches(0, 5, batches_of, depth=2)
    assert next(it) == (0, 0, 0)
    it.close()  # what `break` in the training loop does
    time.sleep(0.3)
    assert not any(t.name == "biovita-prefetch" and t.is_alive() for t in threading.enumerate())
