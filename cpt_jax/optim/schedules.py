"""Learning-rate schedules for continual pre-training.

``warmup_cosine``: linear warmup then cosine decay to ``min_lr`` over the whole task
sequence, with no reset between tasks (Abbes et al. 2025, "Revisiting Replay and Gradient
Alignment for Continual Pre-Training of LLMs": warmup 1% of steps, cosine to min_lr).
"""

from __future__ import annotations

import jax.numpy as jnp


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float):
    """step -> lr: 0 -> peak linearly over warmup_steps, then cosine down to min_lr at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1) / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = min_lr + 0.5 * (peak_lr - min_lr) * (1 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule
