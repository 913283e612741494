"""One step's samples -> {"input_ids", "labels"} of shape (micro_num, micro_bsz, seq_len)."""

import torch


def collate_micro_batches(samples: list[dict], micro_num: int) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    return {key: value.view(micro_num, -1, *value.shape[1:]) for key, value in batch.items()}
