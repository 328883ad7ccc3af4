"""Threshold groups: which adapted layers share one τ (`JumpLoraConfig.threshold_mode`). Plain data, no torch."""

from __future__ import annotations

import re

THRESHOLD_MODES = ("global", "per_block", "per_module")
_FIRST_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def threshold_group(threshold_mode: str, module_name: str) -> str:
    """Name of the threshold group of an adapted module: "global", its block path, or its own name."""
    if threshold_mode == "global":
        return "global"
    if threshold_mode == "per_block":
        match = _FIRST_INDEX.match(module_name)
        return match.group(1) if match else module_name
    return module_name
