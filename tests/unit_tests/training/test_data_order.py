"""Which samples each iteration reads depends only on consumed_samples: a resumed
run reads what an uninterrupted run would have, nothing repeated, nothing skipped."""

import pytest
import torch

from megabridge.training.data.batching import global_batch_indices, micro_batches
from megabridge.training.data.mock import MockDataset

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_each_sample_is_read_once_in_order_over_all_ranks(dp_size):
    gbs, iterations = 8, 6
    read = []
    for it in range(iterations):
        for rank in range(dp_size):
            read += global_batch_indices(it * gbs, gbs, rank, dp_size, dataset_len=10**6)
    assert read == list(range(iterations * gbs))


def tokens(dataset, consumed: int) -> torch.Tensor:
    batches = micro_batches(dataset, consumed, 8, 4, 0, 1, torch.device("cpu"))
    return torch.cat([b["tokens"] for b in batches])


def test_a_resumed_run_reads_the_same_batches_as_an_uninterrupted_one():
    uninterrupted = [tokens(MockDataset(1024, 16, seed=1234), it * 8) for it in range(6)]
    fresh_process = MockDataset(1024, 16, seed=1234)  # a restart builds the dataset anew
    resumed = [tokens(fresh_process, it * 8) for it in range(3, 6)]
    for a, b in zip(uninterrupted[3:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(uninterrupted[3], uninterrupted[4])
