"""`python tools/train_tokenizer.py` = the console script `mmpretrain-train-tokenizer` (mmpretrain.cli.train_tokenizer); this
wrapper keeps checkouts, the Makefile and `import train_tokenizer` working."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
_impl = importlib.import_module("mmpretrain.cli.train_tokenizer")
globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})  # its names, as before

if __name__ == "__main__":
    sys.exit(_impl.main())
