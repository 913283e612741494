"""Datasets, samplers and the batch layout the trainer consumes."""
from .collate import collate_micro_batches
from .datasets import DummyDataset, TokenWindowDataset
from .sampler import StepBatchSampler
from .stdlib_corpus import load_stdlib_corpus

__all__ = ["collate_micro_batches", "DummyDataset", "TokenWindowDataset", "StepBatchSampler", "load_stdlib_corpus"]
