"""Learning-rate schedules as open_clip_train has them: linear warmup, then cosine to 0, constant, or constant with
a polynomial cooldown; each a pure function of the step, so a resumed run sets the same lr at every step."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup: int,
    total_steps: int,
    kind: str = "cosine",
    cooldown_steps: int = 0,
    cooldown_end_lr: float = 0.0,
    cooldown_power: float = 1.0,
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Args:
        kind: "cosine" (warmup, then half a cosine down to 0 at total_steps), "const" or "const-cooldown" (constant,
            then (1 - e/es)^power from base_lr to cooldown_end_lr over the last cooldown_steps).
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    if kind == "const-cooldown":
        start = total_steps - cooldown_steps
        if step < start:
            return base_lr
        decay = (1 - (step - start) / max(1, total_steps - start)) ** cooldown_power
        return decay * (base_lr - cooldown_end_lr) + cooldown_end_lr
    if kind != "cosine":
        raise ValueError(f"lr scheduler: expected cosine, const or const-cooldown, got {kind!r}")
    e, es = step - warmup, max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr
