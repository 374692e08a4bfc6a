"""Synthetic pretraining data, deterministic from the seed and the sample index.

Each sample is an arithmetic progression of token ids modulo the vocabulary,
with a random start and step: random enough that nothing is memorised, regular
enough that a small model's loss falls within a few iterations.
"""

from __future__ import annotations

import zlib

import torch


class MockDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int = 10**12):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{index}".encode()))
        start = int(torch.randint(self.vocab_size, (1,), generator=gen))
        step = int(torch.randint(1, 8, (1,), generator=gen))
        ids = (start + step * torch.arange(self.seq_length + 1)) % self.vocab_size
        return {
            "tokens": ids[:-1],
            "labels": ids[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }
