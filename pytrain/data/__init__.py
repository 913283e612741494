"""Datasets, samplers and the batch layout the trainer consumes."""

from .collate import collate_micro_batches
from .datasets import DummyDataset, TokenWindowDataset
from .sampler import StepBatchSampler
from .stdlib_corpus import load_stdlib_corpus

__all__ = ["DummyDataset", "StepBatchSampler", "TokenWindowDataset", "collate_micro_batches", "load_stdlib_corpus"]
