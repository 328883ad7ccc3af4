"""Names that moved in 0.3, still importable from their 0.2 module for one minor version (with a FutureWarning)."""

from __future__ import annotations

import importlib
import warnings


def moved(module: str, names: dict[str, tuple[str, str]]):
    """A module `__getattr__` serving `names` (old name → (module now, name now)) with a deprecation warning."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, new = names[name]
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed in 0.4; use jumplora_hf.{target}.{new}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"jumplora_hf.{target}"), new)

    return __getattr__
