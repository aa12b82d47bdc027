"""Data pipeline: WebDataset shards -> decoded, tokenized, exactly resumable batches."""
from .pipeline import DataError, EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["DataError", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader", "Tokenizer",
           "build_tokenizer"]
