"""Plugins: modules a run imports before it builds anything (`run.plugins`), so a modality,
a tower kind or a test's fault hooks can be registered from outside the package.

An entry is `module` (imported) or `module:function` (imported, then the function is called
once per process). Every process of a run loads the same list: the launcher's ranks, the
evaluate / export / inference commands (the list is saved in the run's config)."""
from __future__ import annotations

import importlib
from typing import List, Sequence, Set

_LOADED: Set[str] = set()


class PluginError(ValueError):
    """A plugin entry cannot be imported or called; the message names the entry."""


def load_plugins(specs: Sequence[str]) -> List[str]:
    """Import / call each entry once per process; returns the entries loaded by this call."""
    done = []
    for spec in specs:
        if spec in _LOADED:
            continue
        module, _, func = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure is a bad entry
            raise PluginError(f"plugin '{spec}': cannot import module '{module}': {type(e).__name__}: {e}") from e
        if func:
            fn = getattr(mod, func, None)
            if not callable(fn):
                raise PluginError(f"plugin '{spec}': module '{module}' has no function '{func}'")
            fn()
        _LOADED.add(spec)
        done.append(spec)
    return done
