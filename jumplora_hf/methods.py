"""The continual-learning methods: one registry, with the names the README and the reports use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # the value of `method=` / `--method`
    display_name: str  # how the README, the reports and the plots name it
    jump_gate: bool  # the JumpReLU gate on the adapters' update
    ella: bool  # the ELLA regulariser against the earlier tasks' updates
    olora: bool = False  # O-LoRA's orthogonality of each task's A to the earlier tasks' A
    osf: bool = False  # PEFT's OSF (no LoRA adapters): updates orthogonal to the top singular directions of W


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("inclora", "IncLoRA", jump_gate=False, ella=False),
        Method("ella", "ELLA", jump_gate=False, ella=True),
        Method("jumplora_inclora", "JumpLoRA + IncLoRA", jump_gate=True, ella=False),
        Method("jumplora_ella", "JumpLoRA + ELLA", jump_gate=True, ella=True),
        Method("olora", "O-LoRA", jump_gate=False, ella=False, olora=True),
        Method("jumplora_olora", "JumpLoRA + O-LoRA", jump_gate=True, ella=False, olora=True),
        Method("osf", "OSF (PEFT)", jump_gate=False, ella=False, osf=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {sorted(METHODS)}")
    return METHODS[name]


def display_name(name: str | None) -> str:
    """'JumpLoRA + IncLoRA' for 'jumplora_inclora'; an unknown name is returned as it is."""
    return METHODS[name].display_name if name in METHODS else (name or "run")
