"""Datasets, packing, samplers and the batch layout the trainer consumes (see loader.py for the contract)."""

from .datasets import DummyDataset, TokenWindowDataset
from .loader import BUILTIN_CORPUS, TrainLoader, ValidLoader, build_train_loader, build_valid_loaders
from .stdlib_corpus import load_stdlib_corpus
from .tokenized import DataError

__all__ = [
    "BUILTIN_CORPUS",
    "DataError",
    "DummyDataset",
    "TokenWindowDataset",
    "TrainLoader",
    "ValidLoader",
    "build_train_loader",
    "build_valid_loaders",
    "load_stdlib_corpus",
]
