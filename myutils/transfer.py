"""Moving data to a GPU without making the host wait for it.

A copy from pageable host memory makes CUDA finish the work already queued first (it stages the data
through a pinned buffer), so a training step that copies a schedule, a timestep or an index from the
host each time waits for the GPU each time. Two ways out: small per-step data (per-sample noise, an
index) goes through pinned memory with non_blocking=True; constants (a noise schedule) are copied once
per device and kept (constant_on); Python numbers are filled in on the device (torch.full).
"""
import weakref

import torch

_CONSTANTS = {}  # (id of the host tensor, device) -> (weak reference to it, its version, the copy)


def to_gpu_async(x, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, non-blocking (no stream sync)."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def constant_on(x, device):
    """`x` (a tensor that stays unchanged, e.g. a scheduler's alphas_cumprod) on `device`, copied
    once per device; a new copy is made if `x` was modified in place or replaced."""
    if not torch.is_tensor(x) or x.device == torch.device(device):
        return torch.as_tensor(x, device=device)
    key = (id(x), str(torch.device(device)))
    hit = _CONSTANTS.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        return hit[2]
    copy = to_gpu_async(x, device)
    _CONSTANTS[key] = (weakref.ref(x), x._version, copy)
    return copy


def batch_timesteps(timestep, batch, device):
    """(batch,) timesteps on `device`: a device tensor as it is (one for all, or one per sample); a
    number, or a CPU tensor (its values are on the host already), filled in on the device."""
    if torch.is_tensor(timestep) and timestep.device.type != "cpu":
        t = timestep.reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t
    values = torch.as_tensor(timestep).reshape(-1)
    if values.numel() == 1:
        return torch.full((batch,), values.item(), dtype=values.dtype, device=device)
    return to_gpu_async(values, device)
