"""`python tools/inspect_shards.py` = the console script `mmpretrain-inspect-shards` (mmpretrain.cli.inspect_shards); this
wrapper keeps checkouts, the Makefile and `import inspect_shards` working."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
_impl = importlib.import_module("mmpretrain.cli.inspect_shards")
globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})  # its names, as before

if __name__ == "__main__":
    sys.exit(_impl.main())
