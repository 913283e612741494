"""Token datasets: each item is one sample of seq_len input tokens with its next-token labels."""

import numpy as np
import torch
from torch.utils.data import Dataset


class DummyDataset(Dataset):
    """Random tokens (data.train_folder=None), as InternLM's: for benchmarking, not for learning.
    Sample i is the same on every rank and every run with the same seed."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 1024):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator)
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


class TokenWindowDataset(Dataset):
    """Non-overlapping windows over one long token stream: sample i is tokens[i*L : i*L + L + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens, fewer than one sample "
                f"(data.seq_len + 1 = {seq_len + 1}): lower data.seq_len"
            )
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict:
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}
