"""A training worker killed by Ray's memory monitor ends the job in one line naming the node and the knobs."""

from __future__ import annotations

import pytest
import ray.exceptions

from prism_ray.distributed import WorkerOutOfMemory, out_of_memory

# The first lines of the message Ray 2.60 raised when a full-shape SD v1.5 fine-tune did not fit a 24 GB node.
RAY_TEXT = ("7 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, "
            "ID: aaa9fd10f96015a75e253d5609abfa7f550b2a84d4e17a3abac582a0) was 22.72GB used / 23.54GB limit "
            "(0.965055)\nOOM kill reason: Memory usage 24085794816B exceeded threshold")


def test_an_oom_anywhere_in_the_chain_becomes_one_line():
    try:
        try:
            raise ray.exceptions.OutOfMemoryError(RAY_TEXT)
        except ray.exceptions.OutOfMemoryError as inner:
            raise RuntimeError("Training failed due to controller error:\n" + RAY_TEXT) from inner
    except RuntimeError as err:
        oom = out_of_memory("finetune", err, "lower train.micro_batch_size")
    assert isinstance(oom, WorkerOutOfMemory)
    text = str(oom)
    assert "\n" not in text
    assert text == ("finetune: Ray killed a worker for lack of memory (node 192.0.2.2: 22.72GB used of 23.54GB); "
                    "lower train.micro_batch_size")


@pytest.mark.parametrize("err", [RuntimeError("loss is NaN"), ValueError("bad row 3")])
def test_other_failures_are_not_called_memory(err):
    assert out_of_memory("finetune", err, "x") is None
