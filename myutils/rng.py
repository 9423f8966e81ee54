"""Per-sample randomness: what a sample draws depends on (seed, epoch, index), nothing else.

The generators live on the CPU and every draw names the generator's device, then moves to where it
is used: a sample gets the same numbers on a GPU as here, no CUDA generator is ever needed, and no
draw can be made on one device with a generator of another ("Expected a 'cpu' device type for
generator"). The draws are small (one latent per sample); they go to a GPU from pinned memory without
blocking (a copy from pageable memory would wait for the GPU to finish its queued work first).
"""
import torch

from .transfer import to_gpu_async


def sample_generators(batch, seed):
    """One CPU generator per sample, seeded by (seed, epoch, index). The noise and timestep a sample
    gets then do not depend on the rank, on the batch it shares or on a restored RNG state, so
    2 ranks x batch B train exactly like 1 rank x batch 2B, and a resumed run like a straight one.
    batch["epoch"] and batch["index"] are CPU tensors or lists (myutils/data.to_device keeps them there)."""
    epochs, indices = (torch.as_tensor(batch[k]).reshape(-1).tolist() for k in ("epoch", "index"))
    # modulo 2**64, what a generator takes (a large --seed would overflow it); smaller values unchanged
    return [torch.Generator("cpu").manual_seed(((seed * 1_000_003 + int(e)) * 1_000_033 + int(i)) % 2 ** 64)
            for e, i in zip(epochs, indices)]


def _home(generator):
    """Where a draw from `generator` is made: its own device (the global CPU RNG for None)."""
    return generator.device if generator is not None else "cpu"


def randn_per_sample(generators, shape, device, dtype=torch.float32):
    """(B, *shape) standard normal draws, sample i from generators[i], on `device`."""
    return to_gpu_async(torch.stack([torch.randn(shape, generator=g, device=_home(g), dtype=dtype) for g in generators]), device)


def randint_per_sample(generators, high, device):
    """(B,) integers in [0, high), sample i from generators[i], on `device`."""
    return to_gpu_async(torch.cat([torch.randint(0, high, (1,), generator=g, device=_home(g)) for g in generators]), device)


def rand_per_sample(generators, device):
    """(B,) uniform draws in [0, 1), sample i from generators[i], on `device`."""
    return to_gpu_async(torch.cat([torch.rand((1,), generator=g, device=_home(g)) for g in generators]), device)
