"""A value moving between two settings over training: beta warm-up/anneal, reward curricula."""
import math


def value_at(step, total_steps, start, end=None, schedule="constant"):
    """`start` at step 0, `end` at total_steps and after: constant (always start), linear, or a half
    cosine (flat at both ends). A rising schedule is a warm-up, a falling one an anneal."""
    if schedule == "constant" or end is None:
        return start
    progress = min(max(step / max(1, total_steps), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}: constant, linear or cosine")
