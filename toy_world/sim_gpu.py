"""A simulated CUDA GPU that runs whole programs (DESIGN.md section 13).

Inside `simulated_gpu()` a process behaves as if it had one CUDA GPU: `torch.cuda.is_available()` is
True, accelerate picks "cuda:0", autocast, GradScaler and the fused AdamW take their CUDA paths, and
every tensor on "cuda" is a `SimCudaTensor`: real values in CPU storage that report `cuda:0` to Python
(to C++ it is on "meta", whose device guards and autograd queue need no driver). Each aten op is
checked at dispatch as CUDA checks it, then computed on the CPU, so `.item()`, backward, optimizers,
checkpoints and whole `main()`s run with real numbers, in the threads the program starts too. What
fails here fails on a GPU:
- a CPU tensor meeting a CUDA one (a CPU 0-dim scalar is allowed where CUDA's TensorIterator allows it:
  pointwise ops), CPU indexed by a CUDA index, `numpy()` of a CUDA tensor;
- a random draw on "cuda" from a CPU generator;
- CUDA autocast's op lists (aten/src/ATen/autocast_mode.h), applied by a torch function mode above
  autograd as the AutocastCUDA kernels apply them: fp16/bf16 casts are recorded, and the dtype clashes
  they produce, GradScaler's refusal of fp16 gradients and the like follow.
Counted, as a GPU pays for them (SyncCounter, per interval between optimizer steps): host syncs
(`.item()`, `bool()`, `.tolist()`, `.cpu()`, a copy to the host, ops whose output size depends on the
data), copies from pageable host memory (CUDA syncs the stream before them), CPU indices of CUDA
tensors, and pinned copies made without `non_blocking=True`.
Convolutions, matrix products and attention in fp16/bf16 are computed in fp32 and rounded once, as
CUDA's kernels accumulate (and several times faster than the CPU's half kernels).
Not modelled: speed, memory, NCCL, streams and events beyond no-ops, CUDA generators.
"""
import contextlib
import copy
import functools
import threading
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten


class SimCudaTensor(torch.Tensor):
    """A CUDA tensor as a GPU program sees it; its values live in `self.elem`, a CPU tensor."""

    @staticmethod
    def __new__(cls, elem, requires_grad=False):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, layout=elem.layout, device="meta", requires_grad=requires_grad)
        r.elem = elem
        return r

    # To C++ the tensor is on "meta" (no CUDA runtime call anywhere: device guards of meta are no-ops,
    # autograd runs it on the CPU queue); to Python code it is on cuda:0.
    device = property(lambda self: CUDA)
    is_cuda = property(lambda self: True)
    is_meta = property(lambda self: False)
    is_cpu = property(lambda self: False)

    def get_device(self):
        return 0

    def tolist(self):
        _active().counter.record("tolist")
        return self.elem.tolist()

    def numpy(self, *, force=False):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    def __array__(self, dtype=None, copy=None):
        self.numpy()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"a simulated CUDA tensor was used outside simulated_gpu() ({func})")

    def __tensor_flatten__(self):  # makes nn.Module.to swap parameters in place (identity kept, as on a GPU)
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return SimCudaTensor(inner["elem"])

    def __repr__(self, *, tensor_contents=None):
        return f"SimCudaTensor({self.elem!r}, device='cuda:0')"

    # storage identity (safetensors de-duplicates shared tensors by it)
    def untyped_storage(self):
        return self.elem.untyped_storage()

    def data_ptr(self):
        return self.elem.data_ptr()

    def __reduce_ex__(self, proto):  # torch.save writes the values (as loading with map_location="cpu" gives)
        _active().counter.record("save")
        return self.elem.detach().__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        out = SimCudaTensor(copy.deepcopy(self.elem.detach(), memo), requires_grad=self.requires_grad)
        if getattr(self, "_is_param", False):
            out._is_param = True
        memo[id(self)] = out
        return out


def _active():
    if _STATE.mode is None:
        raise RuntimeError("simulated_gpu() is not active")
    return _STATE.mode


class _State:
    mode = None


_STATE = _State()
_THREAD = threading.local()


class SimulatedGPUError(RuntimeError):
    """What a real GPU would raise (device mismatch, wrong generator); the message says which op."""


class SyncCounter:
    """Host syncs, by kind, attributed to the interval between optimizer steps they happened in
    (interval k: after the k-th optimizer step, before the next). `mark(label)` tags the current
    interval with what else ran in it (logging, validation, a checkpoint, sampling), so the steady
    state (intervals with nothing else in them) can be told apart."""

    def __init__(self, keep_stacks=False):
        self.events = []  # (interval, kind, where)
        self.marks = {}  # interval -> set of labels
        self.step = 0
        self.lock = threading.Lock()
        self.keep_stacks = keep_stacks

    def record(self, kind):
        where = "".join(traceback.format_stack(limit=30)[:-3]) if self.keep_stacks else ""
        with self.lock:
            self.events.append((self.step, kind, where))

    def mark(self, label):
        with self.lock:
            self.marks.setdefault(self.step, set()).add(label)

    def per_step(self):
        """{interval: count} for intervals 0..self.step (torch.save of a CUDA tensor not counted)."""
        counts = {k: 0 for k in range(self.step + 1)}
        for step, kind, _ in self.events:
            if kind != "save":
                counts[step] += 1
        return counts

    def steady(self):
        """{interval: count} of the intervals between two optimizer steps in which nothing but
        training ran (not the set-up before the first, nor what follows the last)."""
        counts = self.per_step()
        return {k: n for k, n in counts.items() if 0 < k < self.step and not self.marks.get(k)}


# Ops whose CUDA kernels accept CPU index tensors for a CUDA self.
_CPU_INDICES_OK = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Ops whose output size depends on the values: the host must wait for the GPU.
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default, aten._unique2.default,
                   aten._unique.default, aten.unique_consecutive.default, aten.nonzero_static.default}
_PINNED = weakref.WeakValueDictionary()  # id -> tensor pinned by our pin_memory()


def _leaves(args, kwargs):
    """The tensors and values of an aten call (its lists are one level deep)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _unwrap(a):
    if type(a) is SimCudaTensor:
        return a.elem
    if isinstance(a, (list, tuple)):
        return type(a)(x.elem if type(x) is SimCudaTensor else x for x in a)
    return a


def _wrap(out, by_elem):
    """Outputs as simulated tensors; an output that is an input's storage object (in-place, out=) is that input."""
    if isinstance(out, torch.Tensor):
        return by_elem[id(out)] if id(out) in by_elem else SimCudaTensor(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap(o, by_elem) for o in out)
    return out


# Convolutions, matrix products and attention in fp16/bf16: CUDA's kernels accumulate in fp32 and round
# the result once; the CPU's half kernels are several times slower than fp32 ones. Computed here in fp32
# and rounded to the inputs' dtype (after the dtype check those kernels make).
_ACCUMULATE_FP32 = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
                    aten.bmm.default, aten.baddbmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
                    aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
_LOW = (torch.float16, torch.bfloat16)


def _in_fp32(func, args, kwargs):
    floats = [t for t in _leaves(args, kwargs) if torch.is_tensor(t) and t.is_floating_point()]
    low = {t.dtype for t in floats}
    if not low & set(_LOW):
        return func(*args, **kwargs)
    if len(low) > 1:  # let the kernel raise the error a GPU raises
        return func(*args, **kwargs)
    dtype = low.pop()
    up = lambda a: a.float() if torch.is_tensor(a) and a.dtype == dtype else a  # noqa: E731
    out = func(*(up(a) if not isinstance(a, (list, tuple)) else type(a)(up(x) for x in a) for a in args),
               **{k: up(v) for k, v in kwargs.items()})
    down = lambda o: o.to(dtype) if torch.is_tensor(o) and o.dtype == torch.float32 else o  # noqa: E731
    return type(out)(down(o) for o in out) if isinstance(out, (list, tuple)) else down(out)


def _is_cuda(device):
    return device is not None and torch.device(device).type == "cuda"


def _is_sim_device(device, sims):
    """cuda, or "meta" where C++ took it from a simulated tensor's options (`new_zeros`, a composite
    op's temporaries, the backward formulas' zeros); elsewhere meta is meta (models built empty before
    their weights load, in calls that hold no simulated tensor)."""
    if device is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "meta" and (bool(sims) or getattr(_THREAD, "sim_calls", 0) > 0
                                                   or torch._C._current_autograd_node() is not None))


class SimCudaMode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():  # below autograd nothing needs the function mode (it costs a call per tensor method)
            return self._dispatch(func, args, kwargs or {})

    def _dispatch(self, func, args, kwargs):
        flat = _leaves(args, kwargs)
        sims = [t for t in flat if type(t) is SimCudaTensor]
        target = kwargs.get("device")
        to_cuda = _is_sim_device(target, sims)

        if func is aten.is_pinned.default:
            return _PINNED.get(id(args[0])) is args[0]
        if func is aten._to_copy.default:
            return self._to_copy(func, args, kwargs, to_cuda, target)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if type(dst) is SimCudaTensor and type(src) is not SimCudaTensor:
                self._host_to_device(src, kwargs.get("non_blocking", False))
                dst.elem.copy_(src)
                return dst
            if type(src) is SimCudaTensor and type(dst) is not SimCudaTensor:
                self.counter.record("copy to host")
                dst.copy_(src.elem)
                return dst
        if sims:
            if func is aten._local_scalar_dense.default:
                self.counter.record("item")
            elif func in _DATA_DEPENDENT or (func in _CPU_INDICES_OK and any(
                    torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))):
                self.counter.record(f"{func} (data-dependent size)")  # a boolean mask index runs nonzero
            if self._check_devices(func, args, flat):
                self.counter.record("CPU index copied to the GPU")
        if "generator" in kwargs:
            self._check_generator(func, kwargs, bool(sims) or to_cuda)

        unwrapped_args = tuple(_unwrap(a) for a in args)
        unwrapped_kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        if to_cuda:
            unwrapped_kwargs["device"] = torch.device("cpu")
        if sims and func in _ACCUMULATE_FP32:
            out = _in_fp32(func, unwrapped_args, unwrapped_kwargs)
        else:
            out = func(*unwrapped_args, **unwrapped_kwargs)
        if not (sims or to_cuda):
            return out
        return _wrap(out, {id(t.elem): t for t in sims})

    def _to_copy(self, func, args, kwargs, to_cuda, target):
        src = args[0]
        kw = dict(kwargs)
        if isinstance(src, SimCudaTensor):
            if target is not None and torch.device(target).type == "cpu":  # device -> host
                self.counter.record("copy to host")
                kw["device"] = target
                return func(src.elem, *args[1:], **kw)
            kw.pop("device", None)
            return SimCudaTensor(func(src.elem, *args[1:], **kw))
        if to_cuda:
            if src.device.type != "cpu":
                raise SimulatedGPUError(f"cannot copy a {src.device} tensor to the simulated GPU")
            self._host_to_device(src, kw.get("non_blocking", False))
            kw["device"] = "cpu"
            kw.pop("non_blocking", None)
            out = func(src, *args[1:], **kw)
            if out is src:
                out = out.clone()
            return SimCudaTensor(out)
        return func(*args, **kwargs)

    def _host_to_device(self, src, non_blocking):
        """A copy from pageable memory syncs the stream (CUDA stages it through a pinned buffer); one
        from pinned memory only without non_blocking=True."""
        if not torch.is_tensor(src):
            return
        if _PINNED.get(id(src)) is not src:
            self.counter.record("copy from pageable host memory")
        elif not non_blocking:
            self.counter.record("pinned copy without non_blocking")

    @staticmethod
    def _check_devices(func, args, flat):
        pointwise = torch.Tag.pointwise in func.tags
        indices = ()
        if func in _CPU_INDICES_OK and isinstance(args[0], SimCudaTensor):
            indices = {id(t) for t in pytree.tree_leaves(args[1]) if torch.is_tensor(t) and type(t) is not SimCudaTensor}
        if func in _CPU_INDICES_OK and not isinstance(args[0], SimCudaTensor) and torch.is_tensor(args[0]):
            raise SimulatedGPUError(f"indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                                    f"[{func}: a CPU tensor indexed by a CUDA index]")
        for t in flat:
            if not torch.is_tensor(t) or isinstance(t, SimCudaTensor) or t.device.type == "meta":
                continue
            if id(t) in indices or (pointwise and t.dim() == 0):
                continue
            raise SimulatedGPUError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                    f"cuda:0 and {t.device}! [{func}, CPU tensor of shape {tuple(t.shape)}]")
        return bool(indices)  # CPU indices: the kernel copies them from pageable memory

    @staticmethod
    def _check_generator(func, kwargs, on_cuda):
        gen = kwargs.get("generator")
        if gen is None:
            return
        if on_cuda and gen.device.type != "cuda":
            raise SimulatedGPUError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' [{func}]")


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.h, torch 2.11), by the names Python code calls
# them by. A torch function mode sees only the outermost call, so composites (C++ or Python) that call
# a listed op inside are listed by their own name with the dtype that inner op gives their result
# (F.interpolate's modes but "area" run upsample kernels; F.normalize and Tensor.norm a vector norm).
_LOWER_PRECISION = frozenset("""_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
    convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot vecdot linear addbmm baddbmm bmm chain_matmul
    linalg_multi_dot multi_dot lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell scaled_dot_product_attention""".split())
_FP32 = frozenset("""acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm
    group_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    nll_loss_nd hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist
    cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d
    upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa
    upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa cross_entropy_loss linalg_norm pairwise_distance
    cross_entropy interpolate upsample normalize norm __rpow__""".split())
_FP32_SET_OPT_DTYPE = frozenset("prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum".split())
_PROMOTE = frozenset("addcdiv addcmul atan2 arctan2 bilinear cross dot vdot grid_sampler grid_sample index_put tensordot scatter_add".split())
_BANNED = frozenset(["binary_cross_entropy"])
_AUTOCAST_NAMES = _LOWER_PRECISION | _FP32 | _FP32_SET_OPT_DTYPE | _PROMOTE | _BANNED
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


def _autocast_eligible(t):
    return isinstance(t, SimCudaTensor) and t.is_floating_point() and t.dtype != torch.float64


def _autocast_call(func, name, args, kwargs):
    """One listed op under CUDA autocast, as its AutocastCUDA kernel runs it: the casts happen above
    autograd (they are recorded, so gradients reach fp32 weights in fp32), the op runs as is."""
    if name in _BANNED:
        raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast. Many models "
                           "use a sigmoid layer right before the binary cross entropy layer. In this case, combine the two "
                           "layers using torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss.")
    if name == "interpolate" and (kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "area"):
        return func(*args, **kwargs)  # adaptive average pooling: not listed
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if _autocast_eligible(t)]
    if name in _FP32_SET_OPT_DTYPE:
        first = next((a for a in args if torch.is_tensor(a)), None)
        if first is not None and _autocast_eligible(first) and kwargs.get("dtype") is None:
            kwargs = dict(kwargs, dtype=torch.float32)
        return func(*args, **kwargs)
    if name in _LOWER_PRECISION:
        to = torch.get_autocast_dtype("cuda")
    elif name in _FP32:
        to = torch.float32
    else:  # promote
        to = functools.reduce(torch.promote_types, [t.dtype for t in leaves]) if leaves else None
    if to is not None:
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(to) if _autocast_eligible(t) and t.dtype != to else t, (args, kwargs))
    return func(*args, **kwargs)


class _SimFunctionMode(TorchFunctionMode):
    """What must happen before C++ sees a call: a bare "cuda" named as device 0 (C++ would ask the
    driver which device is current), tensors built from data on the host then copied, `.cuda()` and
    `.to(cuda_tensor)` as copies to the simulated GPU, and CUDA autocast's casts (the simulated
    tensors are "meta" to C++, so the dispatcher's own AutocastCUDA kernels never fire)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:
            return func(*args, **kwargs)
        args = tuple(_indexed(a) for a in args)
        kwargs = {k: _indexed(v) for k, v in kwargs.items()}
        if func in _FROM_DATA and _is_cuda(kwargs.get("device")):
            if args and torch.is_tensor(args[0]):  # a tensor given: moved (no round trip through the host)
                return args[0].to(CUDA, kwargs.get("dtype"), copy=func is torch.tensor)
            return func(*args, **dict(kwargs, device="cpu")).to(CUDA)
        if func is torch.Tensor.cuda:
            return args[0].to(CUDA, non_blocking=kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
        if func in (torch.Tensor.to, torch.Tensor.type_as) and len(args) > 1 and isinstance(args[1], SimCudaTensor):
            args = (args[0], CUDA, args[1].dtype, *args[2:])
            func = torch.Tensor.to
        if not any(type(t) is SimCudaTensor for t in _leaves(args, kwargs)):
            return func(*args, **kwargs)
        _THREAD.sim_calls = getattr(_THREAD, "sim_calls", 0) + 1  # C++ inside may build tensors from their options
        try:
            name = getattr(func, "__name__", None)
            if name in _AUTOCAST_NAMES and torch.is_autocast_enabled("cuda"):
                return _autocast_call(func, name, args, kwargs)  # nested calls unseen, as under the kernel's exclude guard
            return func(*args, **kwargs)
        finally:
            _THREAD.sim_calls -= 1


def _indexed(value):
    if isinstance(value, str) and value == "cuda":
        return CUDA
    if isinstance(value, torch.device) and value.type == "cuda" and value.index is None:
        return CUDA
    return value


def _pin_memory(self, device=None):
    out = self.clone()
    _PINNED[id(out)] = out
    return out


class _Props:
    name, major, minor, total_memory, multi_processor_count = "Simulated GPU", 9, 0, 80 * 2**30, 132
    uuid, L2_cache_size, is_integrated, is_multi_gpu_board = "sim", 50 * 2**20, False, False


class _Stream:
    """Streams and events: one in-order queue, so every wait is already satisfied."""
    device, device_index, device_type = CUDA, 0, 1

    def __init__(self, *args, **kwargs):
        pass

    def is_capturing(self):
        return False

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DeviceContext:
    """torch.cuda.device(i) and device_of(t): one device, nothing to switch."""

    def __init__(self, device=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event(_Stream):
    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def elapsed_time(self, other):
        return 0.0


def _cuda_patches():
    """torch.cuda's host-side functions as on a machine with one GPU."""
    c = torch.cuda
    optional = {}  # names that differ between torch releases (2.11 asks torch.cuda whether a graph is being captured)
    for name, value in (("is_current_stream_capturing", lambda: False),):
        if hasattr(c, name):
            optional[c, name] = value
    return optional | {
        (c, "is_available"): lambda: True,
        (c, "device_count"): lambda: 1,
        (c, "current_device"): lambda: 0,
        (c, "set_device"): lambda device: None,
        (c, "_lazy_init"): lambda: None,
        (c, "is_initialized"): lambda: True,
        (c, "is_bf16_supported"): lambda including_emulation=True: True,
        (c, "get_device_name"): lambda device=None: _Props.name,
        (c, "get_device_capability"): lambda device=None: (_Props.major, _Props.minor),
        (c, "get_device_properties"): lambda device=None: _Props(),
        (c, "synchronize"): lambda device=None: None,
        (c, "empty_cache"): lambda: None,
        (c, "ipc_collect"): lambda: None,
        (c, "memory_allocated"): lambda device=None: 0,
        (c, "max_memory_allocated"): lambda device=None: 0,
        (c, "memory_reserved"): lambda device=None: 0,
        (c, "max_memory_reserved"): lambda device=None: 0,
        (c, "reset_peak_memory_stats"): lambda device=None: None,
        (c, "mem_get_info"): lambda device=None: (_Props.total_memory, _Props.total_memory),
        (c, "get_rng_state"): lambda device="cuda": torch.get_rng_state(),
        (c, "get_rng_state_all"): lambda: [torch.get_rng_state()],
        (c, "set_rng_state"): lambda state, device="cuda": None,
        (c, "set_rng_state_all"): lambda states: None,
        (c, "manual_seed"): lambda seed: None,
        (c, "manual_seed_all"): lambda seed: None,
        (torch.accelerator, "is_available"): lambda: True,
        (torch.accelerator, "current_accelerator"): lambda check_available=False: torch.device("cuda"),
        (torch.accelerator, "device_count"): lambda: 1,
        (torch.accelerator, "current_device_index"): lambda: 0,
        (torch.accelerator, "set_device_index"): lambda device: None,
        (c, "device"): _DeviceContext,
        (c, "device_of"): _DeviceContext,
        (c, "_exchange_device"): lambda device: 0,
        (c, "_maybe_exchange_device"): lambda device: 0,
        (c, "current_stream"): lambda device=None: _Stream(),
        (c, "default_stream"): lambda device=None: _Stream(),
        (c, "Stream"): _Stream,
        (c, "Event"): _Event,
        (c, "stream"): lambda stream: contextlib.nullcontext(),
        (torch.accelerator, "current_stream"): lambda device=None: _Stream(),
        (torch.accelerator, "synchronize"): lambda device=None: None,
        (torch.Tensor, "pin_memory"): _pin_memory,
    }


def _thread_run(real_run):
    """Threads started inside the simulation (a thread pool scoring rewards, a loader's pinning thread,
    a library loading weights in parallel) see the same GPU: modes are per thread."""
    def run(self):
        mode = _STATE.mode
        if mode is None:
            return real_run(self)
        with _SimFunctionMode(), SimCudaMode(mode.counter):
            return real_run(self)
    return run


def _engine_in_sim(real):
    """backward() reaches the engine through torch functions, so the function mode is off by then and the
    engine would capture its absence: checkpointed recomputation in backward would then miss CUDA autocast
    and the bare-"cuda" handling. Put it back for the engine to capture."""
    def run_backward(*args, **kwargs):
        if _STATE.mode is None:
            return real(*args, **kwargs)
        with _SimFunctionMode():
            return real(*args, **kwargs)
    return run_backward


@contextlib.contextmanager
def simulated_gpu(counter=None, count_optimizer_steps=True):
    """Run the block as on a machine with one CUDA GPU (see the module's docstring). Yields the
    SyncCounter; its `step` advances after every optimizer step."""
    counter = counter or SyncCounter()
    patches = _cuda_patches()
    patches[threading.Thread, "run"] = _thread_run(threading.Thread.run)
    import torch.autograd.graph as autograd_graph
    for module in (autograd_graph, torch.autograd):
        patches[module, "_engine_run_backward"] = _engine_in_sim(autograd_graph._engine_run_backward)
    saved = {key: getattr(*key) for key in patches}
    for (obj, name), value in patches.items():
        setattr(obj, name, value)
    hook = None
    if count_optimizer_steps:
        def advance(optimizer, args, kwargs):
            counter.step += 1
        hook = torch.optim.Optimizer.register_optimizer_step_post_hook if False else __import__("torch.optim.optimizer", fromlist=["x"]).register_optimizer_step_post_hook(advance)
    import torch.optim.optimizer as optim_module
    import torch.utils._foreach_utils as foreach_utils
    for types in (optim_module._foreach_supported_types, foreach_utils._foreach_supported_types):
        types.append(SimCudaTensor)  # the optimizers' and clipping's foreach paths, taken on a GPU
    mode = SimCudaMode(counter)
    _STATE.mode = mode
    try:
        with _SimFunctionMode(), mode:
            yield counter
    finally:
        _STATE.mode = None
        if hook is not None:
            hook.remove()
        for types in (optim_module._foreach_supported_types, foreach_utils._foreach_supported_types):
            types.remove(SimCudaTensor)
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
