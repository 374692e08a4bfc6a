"""SFT examples as fixed-length training samples: packed (THD) or padded.

Packing happens once, before the batching layer sees anything: the examples
become a fixed list of packed samples (a function of the examples, the sequence
length and the seed only), which training/data/batching.py then distributes
over data-parallel ranks like any other dataset. So every parallel layout sees
the same samples in the same order.

A packed sample is one sequence of ``seq_length`` positions holding several
whole examples back to back, then padding. Each example's position ids start
at 0, and the sample carries Megatron-Core PackedSeqParams (qkv_format "thd",
cu_seqlens at the example boundaries, the padding as a last segment of its own),
so attention never crosses from one example into another. A padded sample holds
one example and padding. Padding has token id 0 and no loss, so packed and
padded samples of the same examples give the same per-token loss.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from megabridge.training.data.sft import Example

PAD_ID = 0


def pack(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Groups of indices into ``lengths``, each summing to at most ``capacity``.

    Best-fit decreasing (ties broken by a seeded shuffle): each example, longest
    first, goes to the fullest pack it still fits in. The packs are then shuffled.
    """
    rng = np.random.RandomState(seed)
    tiebreak = rng.permutation(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, pack number)
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            packs.append([i])
            room, number = capacity - lengths[i], len(packs) - 1
        else:
            room, number = free.pop(slot)
            packs[number].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, number))
    return [packs[k] for k in rng.permutation(len(packs))]


def _example_arrays(example: Example) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, labels, loss mask) of one example: n - 1 positions each."""
    return example.ids[:-1], example.ids[1:], example.answer[1:].astype(np.float32)


class PackedSFTDataset:
    """Examples packed into sequences of ``seq_length``; one sample per micro-batch."""

    def __init__(self, examples: list[Example], seq_length: int, seed: int):
        self.examples = examples
        self.seq_length = seq_length
        self.packs = pack([len(e) for e in examples], seq_length, seed)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        tokens = np.full(s, PAD_ID, dtype=np.int64)
        labels = np.full(s, PAD_ID, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        bounds, at = [0], 0
        for i in self.packs[index]:
            t, lab, m = _example_arrays(self.examples[i])
            end = at + len(t)
            tokens[at:end], labels[at:end], loss_mask[at:end] = t, lab, m
            position_ids[at:end] = np.arange(len(t))
            bounds.append(end)
            at = end
        if at < s:  # the padding is a segment of its own: attention stays inside it
            position_ids[at:] = np.arange(s - at)
            bounds.append(s)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        }

    @staticmethod
    def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
        """One packed sample -> a [1, s] micro-batch with its PackedSeqParams."""
        from megatron.core.packed_seq_params import PackedSeqParams

        if len(samples) != 1:
            raise ValueError(f"packed micro-batches hold one sample, got {len(samples)}")
        (sample,) = samples
        cu_seqlens = sample["cu_seqlens"]
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        batch = {k: v.unsqueeze(0) for k, v in sample.items() if k != "cu_seqlens"}
        batch["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        return batch


class PaddedSFTDataset:
    """One example per sample, padded to ``seq_length``, in a seeded order."""

    def __init__(self, examples: list[Example], seq_length: int, seed: int):
        self.examples = examples
        self.seq_length = seq_length
        self.order = np.random.RandomState(seed).permutation(len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        t, lab, m = _example_arrays(self.examples[self.order[index]])
        pad = self.seq_length - len(t)
        return {
            "tokens": torch.from_numpy(np.pad(t, (0, pad), constant_values=PAD_ID)),
            "labels": torch.from_numpy(np.pad(lab, (0, pad), constant_values=PAD_ID)),
            "loss_mask": torch.from_numpy(np.pad(m, (0, pad))),
            "position_ids": torch.arange(self.seq_length),
        }
