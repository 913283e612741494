"""Which samples each rank reads at each step.

Step k reads the global batch of G = data_parallel_size * micro_num * micro_bsz samples at positions
[k*G, (k+1)*G) of a per-epoch shuffled order (seeded, so every rank agrees); rank r takes the r-th
contiguous slice. The union over ranks is the same whatever the data-parallel size, which is what makes
a 2-process run equal to a 1-process run with the same global batch.
"""

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler):
    def __init__(
        self,
        num_samples: int,
        samples_per_rank: int,
        data_parallel_size: int,
        data_parallel_rank: int,
        total_steps: int,
        seed: int = 1024,
        shuffle: bool = True,
        start_step: int = 0,
    ):
        self.global_batch = samples_per_rank * data_parallel_size
        if num_samples < self.global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{self.global_batch} (data-parallel size x data.micro_num x data.micro_bsz): "
                f"use more data or a smaller batch"
            )
        self.num_samples, self.samples_per_rank = num_samples, samples_per_rank
        self.rank, self.total_steps, self.seed, self.shuffle = data_parallel_rank, total_steps, seed, shuffle
        self.steps_per_epoch = num_samples // self.global_batch
        self.step = start_step

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return max(0, self.total_steps - self.step)

    def __iter__(self):
        epoch, order = None, None
        while self.step < self.total_steps:
            if self.step // self.steps_per_epoch != epoch:
                epoch = self.step // self.steps_per_epoch
                order = self._order(epoch)
            start = (self.step % self.steps_per_epoch) * self.global_batch + self.rank * self.samples_per_rank
            self.step += 1
            yield order[start : start + self.samples_per_rank].tolist()
