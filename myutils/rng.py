"""Per-sample randomness: what a sample draws depends on (seed, epoch, index), nothing else."""
import torch


def sample_generators(batch, seed, device):
    """One generator per sample, seeded by (seed, epoch, index). The noise and timestep a sample
    gets then do not depend on the rank, on the batch it shares or on a restored RNG state, so
    2 ranks x batch B train exactly like 1 rank x batch 2B, and a resumed run like a straight one."""
    return [torch.Generator(device).manual_seed((seed * 1_000_003 + int(e)) * 1_000_033 + int(i))
            for e, i in zip(batch["epoch"], batch["index"])]


def randn_per_sample(generators, shape, device, dtype=torch.float32):
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def randint_per_sample(generators, high, device):
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=device) for g in generators])
