"""Training plumbing shared by every train_*.py: arguments and config files, accelerator, data,
model loading, LoRA, optimizer, checkpoint/resume, trackers, validation grids and final saving.

Each piece exists once here; the scripts call them and keep only their algorithm.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import warnings

import torch
import yaml

from .args import NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE, POSITIVE_REAL, SEED, integer, real
from .data import EpochSampler, RemovalDataset, entry_digests, fingerprint, raise_problems, read_meta, scan_entries, to_device
from .errors import UserError, output_folder
from .models import DEFAULT_MODEL, DTYPES, load_inpaint_pipeline, load_unet, read_lora
from .sdxl_inpaint import encode_prompt_once, encode_prompt_pair

logger = logging.getLogger("rorem")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CHECKPOINT_PREFIX = "checkpoint-"


# ----------------------------------------------------------------------------- arguments

def add_common_args(parser, meta_kind="triplet", lora=True, meta_aliases=(), unet_aliases=()):
    """Arguments every training script shares. Names follow the RORem scripts. lora=False leaves
    out the remover's LoRA group (the discriminator has its own --rank)."""
    g = parser.add_argument_group("model")
    g.add_argument("--config", default=None, help="YAML file of argument defaults; the command line overrides it")
    g.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL, help="SDXL-inpainting folder or hub id")
    g.add_argument("--pretrained_unet", *unet_aliases, default=None, help="a RORem UNet folder (diffusers layout) to start from")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16 for RORem's released files")
    g.add_argument("--revision", default=None)
    g.add_argument("--prompt", default="", help="training prompt (RORem trains with the empty prompt)")

    g = parser.add_argument_group("data")
    g.add_argument("--meta_path", *meta_aliases, dest="meta_path", nargs="+", default=None,
                   help=f"one or more meta.json files of {meta_kind} entries")
    g.add_argument("--validation_meta_path", nargs="+", default=None, help="held-out entries for validation grids")
    g.add_argument("--resolution", type=integer(8), default=512)
    g.add_argument("--random_crop", action=argparse.BooleanOptionalAction, default=False, help="random instead of central crops")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--dataloader_num_workers", type=NONNEGATIVE, default=None,
                   help="loader processes per rank. Default: on a GPU, min(8, CPU cores per rank - 1), so decoding keeps the "
                        "GPU fed (three 1024 px images cost ~95 ms a sample on one core: bench/bench_data.py); on the CPU 0, "
                        "since the training step itself uses every core")
    g.add_argument("--dataloader_prefetch_factor", type=POSITIVE, default=4, help="batches each loader process keeps ready")
    g.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False, help="encode the VAE latents once and keep them on disk")
    g.add_argument("--latent_cache_dir", default=None, help="default: <output_dir>/latent_cache")
    g.add_argument("--skip_data_check", action=argparse.BooleanOptionalAction, default=False, help="do not open every file before training")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--train_batch_size", type=POSITIVE, default=16, help="per process")
    g.add_argument("--max_train_steps", type=POSITIVE, default=None)
    g.add_argument("--num_train_epochs", type=POSITIVE, default=1, help="used when --max_train_steps is not given")
    g.add_argument("--gradient_accumulation_steps", type=POSITIVE, default=1)
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--learning_rate", type=NONNEGATIVE_REAL, default=5e-5)
    g.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=False, help="multiply lr by batch size, accumulation and processes")
    g.add_argument("--lr_scheduler", default="constant",
                   help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    g.add_argument("--lr_warmup_steps", type=NONNEGATIVE, default=0)
    g.add_argument("--use_8bit_adam", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--adam_beta1", type=real(minimum=0, below=1), default=0.9)
    g.add_argument("--adam_beta2", type=real(minimum=0, below=1), default=0.999)
    g.add_argument("--adam_weight_decay", type=NONNEGATIVE_REAL, default=1e-2)
    g.add_argument("--adam_epsilon", type=POSITIVE_REAL, default=1e-8)
    g.add_argument("--max_grad_norm", type=NONNEGATIVE_REAL, default=1.0)
    g.add_argument("--max_nonfinite_steps", type=POSITIVE, default=10,
                   help="steps in a row with a NaN/inf loss (each skipped) before the run stops")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: what `accelerate launch` was configured with")
    g.add_argument("--vae_precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the SDXL VAE overflows in fp16; keep fp32 unless the VAE is an fp16-fixed one")
    g.add_argument("--enable_xformers_memory_efficient_attention", action=argparse.BooleanOptionalAction, default=False,
                   help="GPU only; PyTorch SDPA is used otherwise")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--ddp_timeout", type=POSITIVE_REAL, default=120.0,
                   help="minutes a rank waits in a collective (NCCL's default is 10): covers what the main process does "
                        "alone while the others wait (validation, held-out evaluation, saving a full UNet)")

    if lora:
        g = parser.add_argument_group("LoRA")
        g.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=False, help="train a LoRA instead of the full UNet")
        g.add_argument("--lora_rank", type=POSITIVE, default=4)
        g.add_argument("--lora_alpha", type=POSITIVE, default=None, help="default: the rank")
        g.add_argument("--lora_target_modules", nargs="+", default=LORA_TARGETS)

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing_steps", type=NONNEGATIVE, default=500)
    g.add_argument("--checkpoints_total_limit", type=POSITIVE, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--tracker_project_name", default="RORem-RL")
    g.add_argument("--logging_dir", default="logs", help="under output_dir")
    g.add_argument("--validation_steps", type=NONNEGATIVE, default=500)
    g.add_argument("--num_validation_images", type=POSITIVE, default=4)
    g.add_argument("--validation_inference_steps", type=POSITIVE, default=50)
    g.add_argument("--validation_strength", type=real(above=0, maximum=1), default=0.99)
    g.add_argument("--validation_batch_size", type=POSITIVE, default=8,
                   help="held-out inputs sampled or scored at a time in validation (bounds its memory, not what it computes)")
    return parser


def parse_args(parser, argv=None, required=("meta_path", "output_dir")):
    """Parse with `--config FILE.yaml` supplying defaults; unknown config keys are an error."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    pre, _ = pre_parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    for name in required:
        if getattr(args, name) in (None, []):
            raise UserError(f"--{name} is required (on the command line or in the --config file)")
    return args


def load_config(path, parser):
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: file not found")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping of argument names to values")
    actions = {a.dest: a for a in parser._actions}
    for key in cfg:
        if key not in actions:
            raise UserError(f"{path}: unknown option {key!r} (not an argument of {os.path.basename(sys.argv[0])})")
    return {key: config_value(path, actions[key], value) for key, value in cfg.items()}


def config_value(path, action, value):
    """A --config value checked and converted as the command line would be (argparse applies neither
    type nor choices to defaults): a quoted "no" for a switch, a list for a number or a value outside
    the choices is an error naming the file and the key."""
    where = f"{path}: {action.dest}"
    if value is None:
        return None
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many != isinstance(value, list):
        raise UserError(f"{where}: expected {'a list' if many else 'one value'}, got {value!r}")
    items = value if many else [value]
    if action.nargs == "+" and not items:
        raise UserError(f"{where}: expected at least one value")
    out = []
    for item in items:
        if isinstance(item, (list, dict)):
            raise UserError(f"{where}: expected a single value, got {item!r}")
        if action.type is not None:
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise UserError(f"{where}: {e}") from None
        if action.choices is not None and item not in action.choices:
            raise UserError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


def check_args(args):
    """Checks that apply to every script, before anything slow happens."""
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU and none is visible here: use --mixed_precision bf16 or no on the CPU")
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution}: must be a multiple of 8")
    if args.validation_steps and int(args.validation_inference_steps * args.validation_strength) < 1:
        raise UserError(f"--validation_inference_steps {args.validation_inference_steps} at --validation_strength "
                        f"{args.validation_strength} runs no denoising step (diffusers runs int(steps * strength))")
    if args.cache_latents and args.random_crop:
        raise UserError("--cache_latents needs central crops: drop --random_crop (random flips are fine)")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes and a CUDA GPU: pip install bitsandbytes") from None
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("--enable_xformers_memory_efficient_attention needs xformers (a GPU extra): "
                            "pip install xformers, or leave it off to use PyTorch SDPA") from None


# ----------------------------------------------------------------------------- accelerator

def make_accelerator(args, find_unused_parameters=False):
    """find_unused_parameters: for models whose forward uses only part of the trainable weights
    (one LoRA of several), so DDP does not wait for gradients that never come."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed

    check_args(args)
    report_to = None if args.report_to in (None, "none") else args.report_to
    # gradients live in DDP's all-reduce buckets instead of beside them: one copy, not two (9.6 GB for a full UNet)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)),
                DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=handlers,
    )  # no cpu=True here: it would silently switch DeepSpeed off; without CUDA accelerate uses the CPU anyway
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if accelerator.state.deepspeed_plugin is not None:
        # the script's arguments are the one source of truth; DeepSpeed clips inside its step
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (1, 2):  # a skipped window relies on ZeRO-1/2 dropping NaN gradients; ZeRO-3 saving is not handled
            raise UserError(f"DeepSpeed ZeRO stage {stage} is not supported: use stage 1 or 2 (configs/deepspeed_zero2.yaml), "
                            "or plain DDP (configs/accelerate_8gpu.yaml)")
        ds["train_micro_batch_size_per_gpu"] = args.train_batch_size
        ds["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        ds["gradient_clipping"] = args.max_grad_norm
        ds["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    output_folder(args.output_dir, "--output_dir")  # on every rank, so a folder that cannot be made stops them all
    found = list_checkpoints(args.output_dir)
    if found and not args.resume_from_checkpoint:  # every rank sees the same folder (checked below on several machines)
        raise UserError(f"--output_dir {args.output_dir} holds checkpoints of an earlier run ({', '.join(found[-3:])}); a new run "
                        "there would overwrite some and mix with the rest: continue it with --resume_from_checkpoint latest, "
                        "or choose another --output_dir")
    shared = [args.output_dir] + ([args.latent_cache_dir] if getattr(args, "cache_latents", False) and args.latent_cache_dir else [])
    check_shared_dirs(accelerator, shared)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # same initialisation on every rank; training noise is per sample (myutils/rng.py)
    return accelerator


def check_shared_dirs(accelerator, dirs):
    """On several machines the ranks meet in these folders (checkpoints the main process writes and
    every rank loads, data_check.json, the latent cache each rank builds a share of), so each must
    be one folder on a filesystem every machine mounts. The main process writes a token there; if a
    rank cannot read it back, every rank stops with the same message (none waits alone later)."""
    if accelerator.num_processes == int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)):
        return  # one machine
    import socket
    import time

    from accelerate.utils import broadcast_object_list

    token = [f"{socket.gethostname()} {os.getpid()} {time.time()}"]
    broadcast_object_list(token)
    for folder in dirs:
        path = os.path.join(folder, ".shared_check")
        if accelerator.is_main_process:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(token[0])
        accelerator.wait_for_everyone()
        try:
            with open(path) as f:
                seen = f.read() == token[0]
        except OSError:
            seen = False
        flag = torch.tensor([0.0 if seen else 1.0], device=accelerator.device)
        missing = accelerator.reduce(flag, "sum").item()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.remove(path)
        if missing:
            raise UserError(f"{folder}: not one folder shared by every machine ({int(missing)} of {accelerator.num_processes} "
                            "ranks could not read what the main process wrote there); put --output_dir (checkpoints) and "
                            "--latent_cache_dir on a filesystem all machines mount")


def weight_dtype(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def init_trackers(accelerator, args, name):
    if accelerator.is_main_process and args.report_to not in (None, "none"):
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config={"script": name, **config},
                                  init_kwargs={"wandb": {"dir": args.output_dir}})  # not the current folder


# ----------------------------------------------------------------------------- data

def load_entries(meta_paths, kind, accelerator, check=True, what="--meta_path", output_dir=None):
    """Read meta files on every process and check their files, shared out: each rank checks every
    n-th entry in threads and all ranks learn every problem, so a bad entry stops every rank with the
    same message and no rank waits alone. A passed check is remembered in <output_dir>/data_check.json
    under a fingerprint of the files (paths, sizes, mtimes): a restart on unchanged data skips it."""
    from accelerate.utils import gather_object

    entries = read_meta(meta_paths, kind)
    if check:
        record = os.path.join(output_dir, "data_check.json") if output_dir else None
        rank, world = accelerator.process_index, accelerator.num_processes
        digests = list(enumerate(entry_digests(entries[rank::world])))  # (k, digest) of entry rank + k * world
        if world > 1:
            digests = gather_object([(rank + k * world, d) for k, d in digests])
        key = fingerprint(kind, [d for _, d in sorted(digests)])
        passed = {}
        if record and os.path.isfile(record):
            try:
                with open(record) as f:
                    passed = json.load(f)
            except (OSError, ValueError):
                passed = {}  # unreadable: check again and rewrite it
        if key in passed:
            logger.info("%s: files unchanged since a passed check (%s), not checked again", what, record)
        else:
            mine = scan_entries(entries[rank::world], progress=len(entries) > 200 and rank == 0)
            found = [(rank + k * world, p, w) for k, (p, w) in enumerate(mine) if p or w]  # (entry position, problem, warning)
            if world > 1:
                found = sorted(gather_object(found))
            raise_problems([p for _, p, _ in found if p])  # the same message on every rank, in entry order
            for _, _, warning in found:
                logger.warning("%s", warning)
            if record and accelerator.is_main_process:
                passed[key] = {"what": what, "entries": len(entries), "meta": [str(m) for m in meta_paths]}
                tmp = record + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(passed, f, indent=1)
                os.replace(tmp, record)
    logger.info("%s: %d entries from %d file(s)", what, len(entries), len(meta_paths))
    return entries


def load_train_and_validation(args, kind, accelerator):
    """Training entries, and the validation entries (--validation_meta_path, else the training ones)."""
    entries = load_entries(args.meta_path, kind, accelerator, check=not args.skip_data_check, output_dir=args.output_dir)
    if not args.validation_meta_path:
        return entries, entries
    return entries, load_entries(args.validation_meta_path, kind, accelerator, what="--validation_meta_path",
                                 output_dir=args.output_dir)


def make_train_dataset(args, entries, kind, accelerator, vae=None, cache_keys=()):
    """The pixel dataset, or with --cache_latents the cached-latent dataset over it."""
    dataset = RemovalDataset(entries, kind, args.resolution, center_crop=not args.random_crop,
                             random_flip=args.random_flip, seed=args.seed)
    if not args.cache_latents:
        return dataset
    from .latent_cache import CachedLatentDataset, LatentCache

    cache = LatentCache(dataset, cache_keys, args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache"), vae)
    cache.build(accelerator)
    return CachedLatentDataset(cache)


def loader_workers(args, device):
    """--dataloader_num_workers, or its default: on a GPU min(8, the CPU cores of one rank - 1), on the CPU 0."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cores // ranks_here - 1))


def make_dataloader(args, dataset, accelerator):
    """Batches of the rank's share of each epoch (EpochSampler). Loader processes decode ahead and stay
    alive across epochs; batches are pinned for the copy to a GPU. A sample depends on (seed, epoch,
    index) only, so the number of workers changes nothing a run sees (a resume test runs with 2)."""
    sampler = EpochSampler(len(dataset), args.train_batch_size, args.seed,
                           accelerator.process_index, accelerator.num_processes)
    workers = loader_workers(args, accelerator.device)
    more = {"persistent_workers": True, "prefetch_factor": args.dataloader_prefetch_factor} if workers > 0 else {}
    # its own generator: each new iterator draws a worker base seed, which must not consume the global
    # RNG (a resumed run creates its iterator at another point of the RNG stream than the straight run)
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=torch.device(accelerator.device).type == "cuda", drop_last=True,
                                       generator=torch.Generator().manual_seed(args.seed), **more)


def prepare_training(args, accelerator, model, params, dataset):
    """The data loader, step budget, optimizer and lr schedule, with model, optimizer and schedule
    passed through accelerator.prepare: (model, optimizer, lr_scheduler, loader, max_steps, num_epochs)."""
    loader = make_dataloader(args, dataset, accelerator)
    max_steps, num_epochs = step_budget(args, loader)
    optimizer = make_optimizer(args, params, accelerator)
    lr_scheduler = make_lr_scheduler(args, optimizer, max_steps, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler, loader, max_steps, num_epochs


def log_validation(accelerator, metrics, step):
    """Validation metrics to the trackers and the log."""
    accelerator.log(metrics, step=step)
    if metrics:
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def step_budget(args, loader):
    """(max_train_steps, num_epochs): --max_train_steps, or --num_train_epochs worth of steps."""
    batches = loader.sampler.batches_per_epoch
    max_steps = args.max_train_steps or args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps)
    return max_steps, math.ceil(max_steps * args.gradient_accumulation_steps / batches)


def epoch_batches(loader, global_step, grad_accum, num_epochs):
    """Yield (epoch, batch) from where `global_step` optimizer steps left off, across epochs."""
    done = global_step * grad_accum
    bpe = loader.sampler.batches_per_epoch
    for epoch in range(done // bpe, num_epochs + 1):
        loader.sampler.set_epoch(epoch, skip_batches=done % bpe if epoch == done // bpe else 0)
        for batch in loader:
            yield epoch, batch


# ----------------------------------------------------------------------------- models

class Components:
    """What a training script needs from the pretrained pipeline, without the text encoders."""

    def __init__(self, args, accelerator, dtype, guidance_prompts=None):
        """guidance_prompts: an optional (prompt, negative prompt) pair, encoded as self.guidance =
        (condition, unconditional) for a teacher's classifier-free guidance."""
        from diffusers import DDPMScheduler

        pipe = load_inpaint_pipeline(args.pretrained_model_name_or_path, args.pretrained_unet,
                                     variant=args.variant, revision=args.revision)
        self.condition = encode_prompt_once(pipe, args.prompt).to(accelerator.device, dtype)
        self.guidance = None
        if guidance_prompts is not None:
            self.guidance = tuple(c.to(accelerator.device, dtype) for c in encode_prompt_pair(pipe, *guidance_prompts))
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sample_scheduler_config = pipe.scheduler.config
        self.unet, self.vae = pipe.unet, pipe.vae
        self.vae.requires_grad_(False)
        self.vae.to(accelerator.device)
        if self.vae.dtype != DTYPES[args.vae_precision]:
            self.vae.to(dtype=DTYPES[args.vae_precision])
        del pipe  # text encoders are not needed after the prompt is encoded
        if args.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()


@contextlib.contextmanager
def adapters_disabled(unet):
    """The LoRA model as its base model (a reference or teacher without a second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def cast_base_weights(model, dtype):
    """Cast a model's parameters and buffers to `dtype`, except LoRA adapter weights: model.to(dtype)
    would also turn adapters added earlier (trainable, kept in fp32) into fp16, which the grad scaler
    then refuses to unscale."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" not in name and t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


def add_lora(unet, args, dtype, adapter_name="default"):
    """Freeze the base UNet (in the compute dtype) and add a trainable LoRA kept in fp32; returns
    its parameters. Several adapters on one model share its base weights (one copy in memory), and
    adding one leaves the others' weights as they were."""
    from peft import LoraConfig

    for name, p in unet.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    cast_base_weights(unet, dtype)
    with warnings.catch_warnings():  # peft warns about every adapter after the first: several are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(args.lora_target_modules)), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()  # fp16 LoRA params break the grad scaler's unscale
    return params


def make_optimizer(args, params, accelerator):
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def make_lr_scheduler(args, optimizer, max_steps, accelerator):
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=args.lr_warmup_steps * scheduler_steps_per_update(accelerator),
                         num_training_steps=max_steps * scheduler_steps_per_update(accelerator))


def scheduler_steps_per_update(accelerator):
    """accelerate's prepared scheduler steps once per process per optimizer step; under DeepSpeed
    the engine steps the bare scheduler once per update instead."""
    from accelerate.utils import DistributedType

    return 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes


# ----------------------------------------------------------------------------- saving

def _lora_pipeline(model):
    """(pipeline class, key prefix) whose save/load_lora_weights fit the model: a FLUX transformer's
    LoRA loads with FluxFillPipeline under "transformer.", a UNet's with the SDXL pipelines under "unet."."""
    if type(model).__name__ == "FluxTransformer2DModel":
        from diffusers import FluxPipeline
        return FluxPipeline, "transformer"
    from diffusers import StableDiffusionXLInpaintPipeline
    return StableDiffusionXLInpaintPipeline, "unet"


def save_unet(unet, output_dir, lora, adapter="default"):
    """Write the UNet (or flow transformer) in a format diffusers loads without our code.

    LoRA: <output_dir>/pytorch_lora_weights.safetensors (for pipe.load_lora_weights), the adapter
    named `adapter`. Full: <output_dir>/unet (a diffusers UNet folder)."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        # PEFT keys as they are: diffusers' key conversion renames only attention layers, and a file
        # mixing both namings loads without the attention LoRA. The config keeps rank and alpha.
        pipeline, prefix = _lora_pipeline(unet)
        config = getattr(unet, "peft_config", {}).get(adapter)
        pipeline.save_lora_weights(output_dir, **{f"{prefix}_lora_layers": get_peft_model_state_dict(unet, adapter_name=adapter),
                                                  f"{prefix}_lora_adapter_metadata": config.to_dict() if config else None})
    else:
        unet.save_pretrained(os.path.join(output_dir, "unet"))


def load_unet_weights(unet, input_dir, lora, adapter="default"):
    """Inverse of save_unet, into an existing (possibly LoRA-wrapped) model."""
    if lora:
        from peft.utils import set_peft_model_state_dict

        pipeline, prefix = _lora_pipeline(unet)
        state, _ = read_lora(input_dir, "checkpoint", pipeline, prefix)
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{input_dir}: LoRA weights do not fit this model (unexpected keys, e.g. {result.unexpected_keys[0]})")
    else:
        loaded = load_unet(os.path.join(input_dir, "unet"))
        unet.load_state_dict(loaded.state_dict())


def register_checkpoint_hooks(accelerator, save_model, load_model, ema=None):
    """Checkpoints hold the trained model in the same format as the final output (save_model(model,
    folder) / load_model(model, folder)), so any checkpoint is usable on its own; accelerate adds
    optimizer, lr scheduler and RNG states (under DeepSpeed it saves and restores the engine itself)."""
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_model(accelerator.unwrap_model(model), output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            load_model(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)


def list_checkpoints(output_dir):
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, args, global_step, extra=None):
    """Write checkpoint-<step> atomically: everything goes into a temporary folder that is renamed
    only when complete, so a kill during saving never leaves a checkpoint `latest` would pick. Old
    checkpoints are pruned after the new one exists. Every process calls this (a main-only
    save_state hangs multi-GPU runs); extra(folder), if given, adds each process's own files."""
    final = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    tmp = final + ".incomplete"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if extra is not None:
        os.makedirs(tmp, exist_ok=True)
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump({"global_step": global_step, "num_processes": accelerator.num_processes}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            for name in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, name))
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def resume_path(args):
    """The checkpoint folder `--resume_from_checkpoint latest|PATH` names, or None."""
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint or None
    found = list_checkpoints(args.output_dir)
    return os.path.join(args.output_dir, found[-1]) if found else None


def resume(accelerator, args):
    """Load `--resume_from_checkpoint latest|PATH`; return the optimizer step to continue from."""
    path = resume_path(args)
    if path is None:
        if args.resume_from_checkpoint:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from step 0", args.output_dir)
        return 0
    state_file = os.path.join(path, "training_state.json")
    if not os.path.isfile(state_file):
        raise UserError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json)")
    args.resume_from_checkpoint = path  # "latest" pinned: what reads the checkpoint later (RL's epoch samples) sees this one
    try:
        with open(state_file) as f:
            state = json.load(f)
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{state_file}: unreadable (a checkpoint cut short?); resume from another one") from None
    problem = checkpoint_problem(path, state.get("num_processes", accelerator.num_processes))
    try:
        if problem is None:
            accelerator.load_state(path)
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        problem = f"cannot be loaded ({e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})"
    if problem is not None:
        others = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(path))) if c != os.path.basename(os.path.normpath(path))]
        raise UserError(f"--resume_from_checkpoint {path}: {problem}; resume from "
                        + (f"an earlier one ({', '.join(others[-3:])})" if others else "scratch in another --output_dir"))
    accelerator.step = step * args.gradient_accumulation_steps  # keeps accumulation boundaries where they were
    logger.info("resumed from %s at step %d", path, step)
    return step


def checkpoint_problem(path, num_processes):
    """What makes a checkpoint folder unusable, found before loading it (every rank reads the same
    folder, so all decide alike): an empty file (a write cut short), or a process's RNG state missing
    or unreadable, which accelerate would skip with an INFO line and the resume would no longer be exact."""
    for folder, _, files in os.walk(path):
        for name in files:
            if os.path.getsize(os.path.join(folder, name)) == 0:
                return f"{os.path.join(folder, name)} is empty (a write cut short)"
    for rank in range(num_processes):
        rng = os.path.join(path, f"random_states_{rank}.pkl")
        try:
            torch.load(rng, weights_only=False)
        except Exception as e:  # missing, truncated, not a pickle
            return f"{rng} cannot be read ({e.__class__.__name__}), so the resumed run would not be the same"
    return None


def save_final(accelerator, args, model, save_model, ema=None, metrics=None):
    """Save the final model (EMA weights if kept) and <output_dir>/final_metrics.json: the final
    validation metrics (null without validation) and the arguments, so a sweep can tabulate its runs."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(model.parameters())
        save_model(model, args.output_dir)
        # written also without validation (metrics null): a sweep sees the run finished, and with which arguments
        with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
            json.dump({"metrics": metrics, "args": {k: v for k, v in vars(args).items()
                                                    if isinstance(v, (int, float, str, bool, list, type(None)))}}, f, indent=1)
        logger.info("saved the final model to %s", args.output_dir)
    accelerator.end_training()


# ----------------------------------------------------------------------------- logging

def log_images(accelerator, name, image, step):
    """One PIL image to every active tracker."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image)]}, step=step)


def log_histogram(accelerator, name, values, step):
    """A histogram of values to every active tracker."""
    values = torch.as_tensor(values).detach().float().cpu()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_histogram(name, values, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Histogram(values.numpy())}, step=step)


def validation_samples(args, entries, kind="triplet", count=None):
    """Fixed held-out samples, centre-cropped, never flipped: the first `count` (default
    --num_validation_images) entries, one per input (pairs of the same source and mask count once)."""
    seen, chosen = set(), []
    for e in entries:
        key = (e.paths["source"], e.paths["mask"])
        if key not in seen and len(chosen) < (count or args.num_validation_images):
            seen.add(key)
            chosen.append(e)
    dataset = RemovalDataset(chosen, kind, args.resolution)
    return [dataset[i] for i in range(len(dataset))]


@contextlib.contextmanager
def mixed_precision_unet(accelerator, unet):
    """Only the UNet's forward runs under the training's autocast, its output cast back to its input's
    dtype, so the pipeline around it keeps one dtype. Autocast around the whole pipeline would run the
    VAE's convolutions in fp16 too, where the SDXL VAE overflows (black or NaN images)."""
    forward = unet.forward
    own = "forward" in vars(unet)  # already wrapped (e.g. a call counter): put that back afterwards

    def autocast_forward(sample, *args, **kwargs):
        with accelerator.autocast():
            out = forward(sample, *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(sample.dtype) if torch.is_tensor(o) else o for o in out)
        out.sample = out.sample.to(sample.dtype)
        return out

    unet.forward = autocast_forward
    try:
        yield unet
    finally:
        if own:
            unet.forward = forward
        else:
            del unet.forward


@contextlib.contextmanager
def vae_dtype_kept(vae):
    """The stock SDXL pipeline encodes and decodes in fp32 when the VAE's config says force_upcast (the
    SDXL VAE does), but afterwards casts the VAE it was given to the UNet's dtype: the VAE that training
    shares would then encode in fp16 from the first validation on. Put its dtype back."""
    dtype = vae.dtype
    try:
        yield vae
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


@torch.no_grad()
def sample_validation(accelerator, args, comps, model, samples, seed=None, steps=None, scheduler=None, strength=None):
    """Inpaint validation samples with the unwrapped `model`, image i with seed (seed or --seed) + i,
    `steps` (default --validation_inference_steps) at `strength` (default --validation_strength) with
    `scheduler` (default: the pipeline's); results pasted into their sources (PIL)."""
    from pipelines.inpaint import inpaint, make_pipeline
    from .img_util import paste_back

    was_training = model.training
    model.eval()
    pipe = make_pipeline(comps.vae, model, scheduler or scheduler_from_config(comps.sample_scheduler_config))
    sources, masks = input_rows(samples)
    results = []
    n = args.validation_batch_size  # bounded memory for long win-rate sets
    for i in range(0, len(samples), n):
        with mixed_precision_unet(accelerator, model), vae_dtype_kept(comps.vae):
            results += inpaint(pipe, comps.condition, sources[i:i + n], masks[i:i + n], args.resolution,
                               steps or args.validation_inference_steps, args.validation_strength if strength is None else strength,
                               seed=(args.seed if seed is None else seed) + i)
    model.train(was_training)
    return [paste_back(r, s, m.convert("L")) for r, s, m in zip(results, sources, masks)]


def viewable_grid(rows, resolution):
    """A grid of equally long rows of PIL images; toy-sized images are upscaled so a person can see them."""
    from .img_util import image_grid

    grid = image_grid([im for row in rows for im in row], rows=len(rows), cols=len(rows[0]))
    scale = max(1, 128 // resolution)
    return grid.resize((grid.width * scale, grid.height * scale), resample=0)


def save_validation_grid(accelerator, args, rows, step):
    """viewable_grid of the rows under <output_dir>/validation/step-N.png, sent to the trackers."""
    grid = viewable_grid(rows, args.resolution)
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    path = os.path.join(args.output_dir, "validation", f"step-{step:06d}.png")
    grid.save(path)
    log_images(accelerator, "validation", grid, step)
    return path


def input_rows(samples, *keys):
    """Grid rows of PIL images: the source, the mask (white = remove), then the given keys."""
    from .img_util import tensor_to_pil

    return ([[tensor_to_pil(s["source"]) for s in samples], [tensor_to_pil(s["mask"].expand(3, -1, -1) * 2 - 1) for s in samples]]
            + [[tensor_to_pil(s[k]) for s in samples] for k in keys])


def run_validation(accelerator, args, comps, unet, samples, step, target_key="GT"):
    """Inpaint the fixed validation samples with fixed seeds; save a grid (rows: source, mask,
    result, target). Main process only."""
    if not accelerator.is_main_process or not samples:
        return None
    results = sample_validation(accelerator, args, comps, accelerator.unwrap_model(unet), samples)
    source, mask, target = input_rows(samples, target_key)
    return save_validation_grid(accelerator, args, [source, mask, results, target], step)


@torch.no_grad()
def compare_with_reference(accelerator, args, samples, results, reference, step, target_key, reward=None, cache=None,
                           mse_key=None):
    """Held-out comparison of a trained model with its reference (DPO: the starting model; LCM: the
    many-step teacher). `results` are the model's (PIL, from sample_validation); `reference()` makes
    the reference's, called once and kept in the dict `cache`. With a reward model both are scored
    and the paired win rate (ties half) comes back with its 95% Wilson interval and both mean scores.
    With `mse_key` (e.g. "GT"), also the masked-region MSE of both against that image.
    Saves a grid of the first --num_validation_images: source, mask, reference, model, target."""
    from .metrics import masked_mse, win_rate
    from .reward_utils import score_results

    if mse_key:
        _, masks, truths = input_rows(samples, mse_key)  # once, not per scored set

    def mean_mse(images):
        return sum(masked_mse(r, g, m) for r, g, m in zip(images, truths, masks)) / len(images)

    cache = {} if cache is None else cache
    if "results" not in cache:
        cache["results"] = reference()
        cache["scores"] = score_results(reward, samples, cache["results"]) if reward else None
        cache["mse"] = mean_mse(cache["results"]) if mse_key else None
    metrics = {"val_masked_mse": mean_mse(results), "val_reference_masked_mse": cache["mse"]} if mse_key else {}
    if reward:
        scores, ref_scores = score_results(reward, samples, results), cache["scores"]
        rate, (low, high) = win_rate(scores, ref_scores)
        metrics.update(val_win_rate=rate, val_win_rate_low=low, val_win_rate_high=high,
                       val_score=sum(scores) / len(scores), val_reference_score=sum(ref_scores) / len(ref_scores))
    n = args.num_validation_images
    source, mask, target = input_rows(samples[:n], target_key)
    save_validation_grid(accelerator, args, [source, mask, cache["results"][:n], results[:n], target], step)
    return metrics


def scheduler_from_config(config):
    """The sampling scheduler the pretrained pipeline ships (Euler for SDXL-inpainting)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


# ----------------------------------------------------------------------------- the loop around an algorithm

class TrainingRun:
    """The bookkeeping every training loop shares, so a script keeps only its algorithm:

        run = TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
        for batch in run.batches():
            with accelerator.accumulate(model):
                loss = algorithm_loss(...)
                if run.loss_is_finite(loss):
                    accelerator.backward(loss)
                run.optimizer_step(optimizer, lr_scheduler, params)
            if run.end_of_step():          # an optimizer step completed: logged, checkpointed
                ...validation every N steps...
        run.finish()

    Non-finite losses void their accumulation window (no update) and abort the run after
    --max_nonfinite_steps in a row. SIGTERM/SIGINT (preemption, Ctrl-C) make every rank save a
    checkpoint at the next step boundary and exit with code 0; a second Ctrl-C stops at once.
    """

    def __init__(self, accelerator, args, loader, max_steps, num_epochs, global_step):
        from tqdm.auto import tqdm

        self.acc, self.args, self.loader = accelerator, args, loader
        self.max_steps, self.num_epochs, self.global_step = max_steps, num_epochs, global_step
        self.bar = tqdm(total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
        self.window_finite, self.nonfinite_in_a_row, self.nonfinite_total = True, 0, 0
        self.window_skipped, self.skipped_total = False, 0
        self.loss_sum, self.loss_count, self.lr = 0.0, 0, 0.0
        self.signal = None
        self.mid_epoch_state = None  # RL: callable(folder) saving the current epoch's samples with a checkpoint
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        logger.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def batches(self):
        """Batches on the device, from where global_step left off, until max_steps."""
        if self.global_step >= self.max_steps:
            return
        try:
            for _, batch in epoch_batches(self.loader, self.global_step, self.args.gradient_accumulation_steps, self.num_epochs):
                yield to_device(batch, self.acc.device)
                if self.global_step >= self.max_steps:
                    return
        except Exception:  # a broken file met by the loader: the bar ends before the one-line error is printed
            self.finish()
            raise

    def _any_rank(self, flag):
        if self.acc.num_processes == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "max").item() > 0)

    @property
    def window_void(self):
        """This accumulation window gets no update (a non-finite loss or a skipped batch in it)."""
        return not self.window_finite or self.window_skipped

    def loss_is_finite(self, loss):
        """False on every rank if the loss is NaN/inf on any rank (then nobody calls backward, so
        no rank waits for a gradient all-reduce the others skip); the window gets no update.
        Also False for the rest of a window already void: its gradients would be dropped anyway
        (and under DeepSpeed a backward at the window's end would apply them)."""
        if self.window_void:  # the same on every rank, so no collective is needed to agree
            return False
        bad = self._any_rank(not torch.isfinite(loss.detach()).all().item())
        if bad:
            self.window_finite = False
        else:
            self.loss_sum += loss.detach().float()
            self.loss_count += 1
        return not bad

    def skip_batch(self):
        """Void this accumulation window without calling it non-finite (e.g. a reward-weighted batch
        whose weights are all zero): no backward, no update, counted as skipped_steps. Decide it from
        values every rank shares (a gathered batch), so all ranks skip alike."""
        self.window_skipped = True

    def optimizer_step(self, optimizer, lr_scheduler, params, ema=None):
        """Clip (a list of params, so clipping sees all of them) and step at accumulation
        boundaries, then the EMA of `params` if one is kept (before end_of_step checkpoints, so a
        checkpoint holds the EMA of its own step); a window with a non-finite loss is discarded."""
        self.lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.acc.sync_gradients and self.window_void and getattr(self.acc, "deepspeed_engine_wrapped", None):
            self._void_deepspeed_window(params, lr_scheduler)
        if self.acc.sync_gradients and not self.window_void:
            if self.args.max_grad_norm > 0:
                self.acc.clip_grad_norm_(params, self.args.max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.step(params)
        lr_scheduler.step()  # every step, so the lr stays a function of global_step
        optimizer.zero_grad(set_to_none=True)

    def _void_deepspeed_window(self, params, lr_scheduler):
        """DeepSpeed updates inside backward and keeps its own gradient buffers: skipping the
        window's last backward would leave the earlier micro-batches' gradients to leak into the next
        window, and a backward there would update from part of this one. So end a void window with a
        NaN gradient on one weight: ZeRO's overflow check then drops the whole window's gradients and
        skips the update, as it does for an fp16 overflow (under fp16 it also halves the loss scale,
        which grows back). The engine does not step the lr schedule on a skipped update; step it here
        so the lr stays a function of global_step, as without DeepSpeed."""
        self.acc.backward(params[0].reshape(-1)[:1].sum() * float("nan"))
        if self.acc.deepspeed_engine_wrapped.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update from a window it had to skip (NaN gradients): "
                               "use ZeRO stage 1 or 2 with its gradient-norm check on")
        lr_scheduler.scheduler.step()

    def end_of_step(self, **metrics):
        """After each micro-batch: returns True when an optimizer step completed, after logging it,
        checkpointing on schedule, and handling non-finite streaks and stop signals."""
        if not self.acc.sync_gradients:
            return False
        self.global_step += 1
        logs = dict(metrics)
        if self.window_skipped:
            self.skipped_total += 1
        if self.window_finite and not self.window_skipped:
            self.nonfinite_in_a_row = 0
            logs["loss"] = self.acc.reduce(self.loss_sum / max(1, self.loss_count), "mean").item()
        elif not self.window_finite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            logger.warning("step %d: non-finite loss, update skipped (%d in a row)", self.global_step, self.nonfinite_in_a_row)
        logs["nonfinite_steps"], logs["skipped_steps"] = self.nonfinite_total, self.skipped_total
        logs["lr"] = self.lr
        self.acc.log(logs, step=self.global_step)
        self.bar.update(1)
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.window_finite, self.window_skipped, self.loss_sum, self.loss_count = True, False, 0.0, 0
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            found = list_checkpoints(self.args.output_dir)
            self.finish()
            raise UserError(f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                            f"{self.global_step}); stopping. Lower --learning_rate, try --mixed_precision bf16 or check "
                            f"the data. Last checkpoint: {found[-1] if found else 'none'}")
        stop = self._any_rank(self.signal is not None)
        if stop or (self.args.checkpointing_steps and self.global_step % self.args.checkpointing_steps == 0):
            save_checkpoint(self.acc, self.args, self.global_step, self.mid_epoch_state)
        if stop:
            self.finish()
            self.acc.end_training()
            logger.warning("stopped by a signal at step %d; continue with --resume_from_checkpoint latest", self.global_step)
            sys.exit(0)
        return True

    def finish(self):
        self.bar.close()
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
