"""What a training script sets up before its loop: the accelerator (DDP/DeepSpeed, trackers), data
(meta files checked over ranks, datasets, loaders), the pretrained components, optimizer and lr
schedule. Not here: the loop itself (loop.py), saving (checkpoint.py), LoRA adapters (adapters.py).
"""
import json
import logging
import math
import os

import torch

from myutils.data import (EpochSampler, RemovalDataset, check_scores_agree, entry_digests, fingerprint, raise_problems, read_meta,
                          scan_entries)
from myutils.errors import UserError, output_folder
from myutils.models import DTYPES, load_inpaint_pipeline
from myutils.sdxl_inpaint import encode_prompt_once, encode_prompt_pair

from . import checkpoint, config

logger = logging.getLogger("rorem")


def make_accelerator(args, find_unused_parameters=False):
    """find_unused_parameters: for models whose forward uses only part of the trainable weights
    (one LoRA of several), so DDP does not wait for gradients that never come."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed

    config.check_args(args)
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
    found = checkpoint.list_checkpoints(args.output_dir)
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


def load_entries(meta_paths, kind, accelerator, check=True, what="--meta_path", output_dir=None):
    """Read meta files on every process and check their files, shared out: each rank checks every
    n-th entry in threads and all ranks learn every problem, so a bad entry stops every rank with the
    same message and no rank waits alone. A passed check is remembered in <output_dir>/data_check.json
    under a fingerprint of the files (paths, sizes, mtimes): a restart on unchanged data skips it."""
    from accelerate.utils import gather_object

    entries = read_meta(meta_paths, kind)
    if kind == "scored":
        check_scores_agree(entries, what)
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


def load_train_and_validation(args, kind, accelerator, validation_kind=None):
    """Training entries, and the validation entries (--validation_meta_path, read as validation_kind,
    default kind; else the training ones)."""
    entries = load_entries(args.meta_path, kind, accelerator, check=not args.skip_data_check, output_dir=args.output_dir)
    if not args.validation_meta_path:
        return entries, entries
    return entries, load_entries(args.validation_meta_path, validation_kind or kind, accelerator, what="--validation_meta_path",
                                 output_dir=args.output_dir)


def make_train_dataset(args, entries, kind, accelerator, vae=None, cache_keys=()):
    """The pixel dataset, or with --cache_latents the cached-latent dataset over it."""
    dataset = RemovalDataset(entries, kind, args.resolution, center_crop=not args.random_crop,
                             random_flip=args.random_flip, seed=args.seed, uint8=True)
    if not args.cache_latents:
        return dataset
    from myutils.latent_cache import CachedLatentDataset, LatentCache

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
    index) only, so the number of workers changes nothing a run sees (a resume test runs with 2).
    Processes x batches ahead are sized so what is in flight fits /dev/shm and page-locked RAM."""
    sampler = EpochSampler(len(dataset), args.train_batch_size, args.seed,
                           accelerator.process_index, accelerator.num_processes)
    workers, prefetch = loader_workers(args, accelerator.device), args.dataloader_prefetch_factor
    if workers > 0:
        workers, prefetch = fit_loader_memory(workers, prefetch, batch_nbytes(dataset, args.train_batch_size),
                                              getattr(accelerator, "is_main_process", True))
    more = {"persistent_workers": True, "prefetch_factor": prefetch} if workers > 0 else {}
    # its own generator: each new iterator draws a worker base seed, which must not consume the global
    # RNG (a resumed run creates its iterator at another point of the RNG stream than the straight run)
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=torch.device(accelerator.device).type == "cuda", drop_last=True,
                                       generator=torch.Generator().manual_seed(args.seed), **more)


def batch_nbytes(dataset, batch_size):
    """Bytes of one batch as the loader's processes send it (one sample is loaded to measure it)."""
    item = dataset[0]
    return batch_size * sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))


def fit_loader_memory(workers, prefetch, nbytes, log=True, shm_free=None, ram_free=None, ranks_here=None):
    """(workers, prefetch) such that the batches in flight (workers x prefetch, each in /dev/shm, then
    pinned in page-locked RAM) take at most half the free /dev/shm and a quarter of the available RAM,
    shared by this machine's ranks: Docker's default 64 MB /dev/shm otherwise ends the run with a bus
    error. Fewer batches ahead first, then fewer processes; none (load in the training process) if not
    even one batch fits. Says what it chose in one line."""
    import shutil

    import psutil

    if shm_free is None:
        shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else float("inf")
    ram_free = psutil.virtual_memory().available if ram_free is None else ram_free
    ranks_here = ranks_here or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    fits = int(min(shm_free / 2, ram_free / 4) / ranks_here // max(1, nbytes))
    chosen = (workers, prefetch)
    if workers * prefetch > fits:
        chosen = (workers, fits // workers) if fits >= workers else (fits, 1) if fits >= 1 else (0, prefetch)
    if log:
        mb = 2 ** 20
        what = (f"{chosen[0]} loader processes x {chosen[1]} batches ahead" if chosen[0] else "no loader processes")
        why = "" if chosen == (workers, prefetch) else f", reduced from {workers} x {prefetch} to fit"
        logger.info("data: %s per rank (%.1f MB a batch%s; /dev/shm %.0f MB free, RAM %.0f MB available, %d rank(s) here)",
                    what, nbytes / mb, why, shm_free / mb, ram_free / mb, ranks_here)
    return chosen


def for_training(args, accelerator, model, params, dataset):
    """The data loader, step budget, optimizer and lr schedule, with model, optimizer and schedule
    passed through accelerator.prepare: (model, optimizer, lr_scheduler, loader, max_steps, num_epochs)."""
    loader = make_dataloader(args, dataset, accelerator)
    max_steps, num_epochs = step_budget(args, loader)
    optimizer = make_optimizer(args, params, accelerator)
    lr_scheduler = make_lr_scheduler(args, optimizer, max_steps, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler, loader, max_steps, num_epochs


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


def make_optimizer(args, params, accelerator):
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    more = {}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
        # on a GPU the fused kernel: one launch for all weights, and with fp16 it takes GradScaler's
        # inf check on the device instead of reading it on the host every step (DeepSpeed steps itself)
        if torch.device(accelerator.device).type == "cuda" and getattr(accelerator.state, "deepspeed_plugin", None) is None:
            more["fused"] = True
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **more)


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
