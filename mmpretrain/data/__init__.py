"""Data pipeline: WebDataset shards -> decoded, tokenized, exactly resumable batches.

The names below load on first use (PEP 562): the pipeline imports torch, and the torch-free
parts (shards, decode, preflight's checks) must not pay for it when a config is refused."""
from importlib import import_module
from typing import Any

_WHERE = {"DataError": ".pipeline", "EvalLoader": ".pipeline", "TrainLoader": ".pipeline",
          "build_eval_loader": ".pipeline", "build_train_loader": ".pipeline",
          "Tokenizer": ".tokenizer", "build_tokenizer": ".tokenizer"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
