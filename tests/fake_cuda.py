"""Fake CUDA on a machine without a GPU (DESIGN.md section 13).

Inside `fake_cuda()` tensors and modules can be moved to "cuda": torch's FakeTensorMode keeps their
shapes, dtypes and devices but no data, and any op that mixes a CUDA tensor with a CPU one raises
FakeTensorDeviceMismatchError, as a real GPU would. Forward passes run; backward and reading values
(.item()) do not. What the harness lets run outside the fake mode, and why:
- loading weights from disk (from_pretrained, LoRA files, torch.load; a text encoder loaded with
  device_map={"": "cuda"} is read on the host, then moved to the fake GPU), building from a config
  (from_config), building the discriminator and adding LoRA adapters: a real run does these on the CPU
  too, and fake tensors cannot hold values; the code under test moves what it built to the device;
- scheduler.set_timesteps: a schedule is CPU bookkeeping that the code reads as Python numbers;
- the SDXL prompt encoders when they run on the CPU (their default): a CPU computation in a real run
  too, whose tokenizer checks read values;
- sample_generators: it reads sample indices as Python ints; a fake tensor has no values, so samples
  whose bookkeeping was derived inside the mode are seeded by position (the seeds do not matter here).
"""
import contextlib
import sys
import types

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

CUDA = torch.device("cuda")


def _outside(fn):
    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return run


def _patch_classmethod(cls, name, patched):
    orig = cls.__dict__[name]
    setattr(cls, name, classmethod(_outside(orig.__func__)))
    patched.append((cls, name, orig))


def _patch_from_pretrained(cls, patched, move=True):
    """Weights are read on the host (fake tensors cannot hold them); a model asked straight onto a GPU
    (device_map={"": "cuda"}) is read there and then moved to the fake GPU whole, unless move=False
    (diffusers models: LoRA adapters added on the fake GPU could not be moved again, so the code's own
    later move, as accelerator.prepare's, stands in)."""
    orig = cls.__dict__["from_pretrained"]

    def from_pretrained(klass, *args, **kwargs):
        device_map = kwargs.get("device_map")
        target = device_map[""] if isinstance(device_map, dict) and list(device_map) == [""] else None
        if target is not None and torch.device(target).type == "cuda":
            kwargs = {k: v for k, v in kwargs.items() if k != "device_map"}
        else:
            target = None
        with unset_fake_temporarily():
            model = orig.__func__(klass, *args, **kwargs)
        return model.to(target) if target is not None and move else model
    setattr(cls, "from_pretrained", classmethod(from_pretrained))
    patched.append((cls, "from_pretrained", orig))


def _patch_everywhere(module, name, make, patched):
    """Replace function `name` of `module` with make(it), in every module that imported it by name."""
    real = getattr(module, name)
    replacement = make(real)
    for holder in list(sys.modules.values()):
        if getattr(holder, name, None) is real:
            patched.append((holder, name, real))
            setattr(holder, name, replacement)


def _on_host_if_real(fn):
    """Building on the host, unless the model was already moved to the (fake) GPU: then it gets its adapters there."""
    def run(model, *args, **kwargs):
        if any(isinstance(p, FakeTensor) for p in model.parameters()):
            return fn(model, *args, **kwargs)
        with unset_fake_temporarily():
            return fn(model, *args, **kwargs)
    return run


def _encode_where_asked(fn):
    """The SDXL prompt encoders run on the CPU by design (their default device): real there, fake on a GPU."""
    def run(pipe, *args, **kwargs):
        device = kwargs.get("device", args[2] if len(args) > 2 else "cpu")
        if torch.device(device).type == "cpu":
            with unset_fake_temporarily():
                return fn(pipe, *args, **kwargs)
        return fn(pipe, *args, **kwargs)
    return run


def _checked_embedding(real):
    """Fake tensors do not check the devices of an embedding lookup (a real GPU does: CUDA token ids
    into an encoder left on the CPU raise in index_select); check them here."""
    def embedding(input, weight, *args, **kwargs):
        if input.device.type != weight.device.type:
            raise RuntimeError(f"Expected all tensors to be on the same device: embedding indices on {input.device}, "
                               f"weight on {weight.device}")
        return real(input, weight, *args, **kwargs)
    return embedding


def _bookkeeping_generators(real):
    """sample_generators reads indices as Python ints: bookkeeping must be on the CPU; indices derived
    inside the fake mode have no values, so those samples are seeded by position."""
    def sample_generators(batch, seed):
        for key in ("epoch", "index"):
            value = batch[key]
            if torch.is_tensor(value) and not isinstance(value, FakeTensor) and value.device.type != "cpu":
                raise AssertionError(f"batch[{key!r}] is on {value.device}: bookkeeping stays on the CPU")
        if any(isinstance(batch[k], FakeTensor) for k in ("epoch", "index")):
            n = len(batch["index"])
            batch = {"epoch": [0] * n, "index": list(range(n))}
        with unset_fake_temporarily():
            return real(batch, seed)
    return sample_generators


@contextlib.contextmanager
def fake_cuda():
    import diffusers
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import PreTrainedModel

    import model.unet_sdxl_discriminator as ud
    import myutils.discriminator_files as dfiles
    import myutils.rng as rng
    import myutils.sdxl_inpaint as si
    import training.adapters as adapters


    patched = []
    for cls in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        _patch_from_pretrained(cls, patched, move=cls is not ModelMixin)
    for cls, name in ((ConfigMixin, "from_config"), (StableDiffusionXLLoraLoaderMixin, "lora_state_dict"),
                      (ud.UNetSDXLDiscriminator, "from_unet")):
        _patch_classmethod(cls, name, patched)
    for name in dir(diffusers):
        cls = getattr(diffusers, name)
        if isinstance(cls, type) and "set_timesteps" in vars(cls):
            patched.append((cls, "set_timesteps", cls.set_timesteps))
            cls.set_timesteps = _outside(cls.set_timesteps)
    _patch_everywhere(torch, "load", _outside, patched)
    for module, name in ((dfiles, "add_discriminator_lora"), (dfiles, "load_discriminator_weights"), (adapters, "add_lora"),
                         (adapters, "load_trainable_lora")):
        _patch_everywhere(module, name, _on_host_if_real, patched)
    for name in ("encode_prompt_once", "encode_prompt_pair"):
        _patch_everywhere(si, name, _encode_where_asked, patched)
    _patch_everywhere(torch.nn.functional, "embedding", _checked_embedding, patched)
    _patch_everywhere(rng, "sample_generators", _bookkeeping_generators, patched)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        for obj, name, orig in reversed(patched):
            setattr(obj, name, orig)


def on_host():
    """Leave the fake mode for a block that a real run also runs on the CPU (building a model, before
    it is moved to the GPU). Inside the fake mode a module can change device or dtype once only."""
    return unset_fake_temporarily()


def fake_accelerator():
    """What the step functions ask of an Accelerator, on the (fake) GPU of one process."""
    return types.SimpleNamespace(device=CUDA, num_processes=1, process_index=0, is_main_process=True, sync_gradients=True,
                                 unwrap_model=lambda m: m, gather=lambda t: t, autocast=contextlib.nullcontext)


def on_cuda(*tensors):
    """Assert every tensor is on the fake GPU (fails on a CPU result), and return them."""
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", f"expected a CUDA tensor, got {type(t).__name__} on {t.device}"
    return tensors
