"""Arguments every training script shares (and the online-RL ones of the two RL scripts), and --config
YAML files that set their defaults through the arguments' own types and choices. Not here: what the
arguments drive (prepare, checkpoint, validation)."""
import argparse
import os
import sys

import torch
import yaml

from myutils.args import NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE, POSITIVE_REAL, SEED, real, resolution
from myutils.errors import UserError
from myutils.models import DEFAULT_MODEL
from myutils.reward_utils import parse_reward_spec
from myutils.rl_utils import ADV_STDS, KL_UNITS

from . import adapters


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
    g.add_argument("--resolution", type=resolution, default=512)
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
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
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
        g.add_argument("--lora_target_modules", nargs="+", default=adapters.LORA_TARGETS)

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing_steps", type=NONNEGATIVE, default=500)
    g.add_argument("--checkpoints_total_limit", type=POSITIVE, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--tracker_project_name", default="RORem-RL")
    g.add_argument("--logging_dir", default="logs", help="under output_dir")
    g.add_argument("--logging_steps", type=POSITIVE, default=10,
                   help="log every N optimizer steps (metrics are averaged on the GPU over the steps in between and read "
                        "once: reading them every step would make the host wait for the GPU each time)")
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
    check_unused_flags(args, parser)
    return args


def check_unused_flags(args, parser):
    """A flag given where nothing reads it would be a silent lie: say so (a YAML default is no flag)."""
    given = lambda name: hasattr(args, name) and getattr(args, name) != parser.get_default(name)  # noqa: E731
    if hasattr(args, "use_lora") and not args.use_lora:
        unused = [k for k in ("lora_rank", "lora_alpha", "lora_target_modules") if given(k)]
        if unused:
            raise UserError(f"--{unused[0]} without --use_lora: a full fine-tune has no LoRA; drop --{unused[0]} or add --use_lora")
    if given("latent_cache_dir") and not args.cache_latents:
        raise UserError("--latent_cache_dir without --cache_latents: nothing is cached there; add --cache_latents or drop it")


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


# ----------------------------------------------------------------------------- online RL (train_RORem_ddpo.py, train_RORem_morl.py)

def add_rl_args(parser):
    g = parser.add_argument_group("online RL")
    g.add_argument("--algorithm", choices=["reinforce", "ppo", "grpo", "pairwise"], default="ppo")
    g.add_argument("--reward", default="discriminator=1", help="name=weight,...: discriminator, preserve, gt, jpeg")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None)
    g.add_argument("--discriminator_base_model", default=None,
                   help="the SDXL-inpainting model the discriminator was built on (default: --pretrained_model_name_or_path)")
    g.add_argument("--sample_steps", type=POSITIVE, default=50, help="DDIM steps of the sampler")
    g.add_argument("--strength", type=real(above=0, maximum=1), default=1.0, help="start from the source noised to strength * T")
    g.add_argument("--eta", type=NONNEGATIVE_REAL, default=1.0, help="DDIM stochasticity (> 0: a log-prob exists)")
    g.add_argument("--noise_level", type=NONNEGATIVE_REAL, default=0.7, help="flow models: the SDE's noise level (> 0)")
    g.add_argument("--naive_sde", action="store_true", help="flow models: Euler step + noise instead of the SDE (changes marginals)")
    g.add_argument("--flow_guidance", type=NONNEGATIVE_REAL, default=30.0, help="flow models: the distilled guidance embedding (FLUX-Fill: 30)")
    g.add_argument("--max_sequence_length", type=POSITIVE, default=512, help="flow models: T5 prompt length")
    g.add_argument("--beta", type=POSITIVE_REAL, default=0.1, help="pairwise: scale of the log-ratio margin in -log sigmoid(beta * margin)")
    g.add_argument("--guidance_scale", type=NONNEGATIVE_REAL, default=1.0)
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--sample_batch_size", type=POSITIVE, default=8, help="inputs per sampling batch per process")
    g.add_argument("--sample_batches_per_epoch", type=POSITIVE, default=4)
    g.add_argument("--group_size", type=POSITIVE, default=1, help="samples per input in a batch (grpo: at least 2)")
    g.add_argument("--num_inner_epochs", type=POSITIVE, default=1)
    g.add_argument("--timestep_fraction", type=real(above=0, maximum=1), default=1.0)
    g.add_argument("--clip_range", type=POSITIVE_REAL, default=1e-4)
    g.add_argument("--adv_clip_max", type=POSITIVE_REAL, default=5.0)
    g.add_argument("--kl_coef", type=NONNEGATIVE_REAL, default=0.0, help="penalty on the per-step KL to the reference (LoRA off), in --kl_unit")
    g.add_argument("--kl_unit", choices=KL_UNITS, default="exact",
                   help="exact: the step's Gaussian KL; flow_grpo: flow_grpo's formula for flow models (the exact KL times the step "
                        "length |dt|), the unit its kl_coef 0.04 was tuned in. Same for SDXL's DDIM steps")
    g.add_argument("--adv_std", choices=ADV_STDS, default="group",
                   help="grpo: divide by each group's reward std, or by the whole batch's (Flow-GRPO's global_std)")
    g.add_argument("--stat_buffer_size", type=POSITIVE, default=32)
    g.add_argument("--stat_min_count", type=POSITIVE, default=16)
    g.add_argument("--eval_epochs", type=NONNEGATIVE, default=0, help="held-out evaluation every N epochs (0: only at start and end)")
    g.add_argument("--eval_samples", type=NONNEGATIVE, default=16)
    g.add_argument("--eval_batch_size", type=POSITIVE, default=8, help="held-out inputs evaluated at a time (bounds its memory)")
    g.add_argument("--checkpointing_epochs", type=NONNEGATIVE, default=1)
    g.add_argument("--export_pairs", default=None, metavar="DIR",
                   help="pairwise, labelled by hand: sample one epoch with the current policy, write its pairs (images, "
                        "trajectories, DIR/pairs.json with empty labels) and exit; train on them with --pair_labels")
    g.add_argument("--pair_labels", default=None, metavar="FILE",
                   help="pairwise: train one epoch on an --export_pairs folder's pairs with the labels in FILE (that "
                        "folder's pairs.json, labels filled in: a, b, tie or null) instead of sampling")


def check_rl_args(args, script):
    """Parse --reward into args.rewards, set args.family from the model, and reject combinations
    that cannot train (one line each, naming the flag)."""
    from pipelines.flow_inpaint import model_family

    args.rewards = parse_reward_spec(args.reward)
    if not args.use_lora:
        raise UserError(f"{script} trains a LoRA (the reference is the LoRA-off model): drop --no-use_lora")
    args.family = model_family(args.pretrained_model_name_or_path)
    if args.family == "sdxl" and args.eta <= 0:
        raise UserError("--eta must be > 0: a deterministic DDIM step has no variance, hence no log-prob to train")
    if args.family == "flow" and args.noise_level <= 0:
        raise UserError("--noise_level must be > 0: the flow ODE step has no variance, hence no log-prob to train")
    if args.family == "flow" and args.pretrained_unet:
        raise UserError("--pretrained_unet is for SDXL-inpainting models; a flow model's transformer comes from its own folder")
    if "discriminator" in args.rewards and not args.discriminator_path:
        raise UserError("--reward discriminator needs --discriminator_path")
    if args.algorithm == "grpo" and args.group_size < 2:
        raise UserError("--algorithm grpo compares samples of the same input: --group_size must be at least 2")
    if args.algorithm == "pairwise" and (args.group_size != 2 or args.train_batch_size % 2):
        raise UserError("--algorithm pairwise trains on pairs from the same start: --group_size must be 2 and --train_batch_size even")
    if (args.export_pairs or args.pair_labels) and args.algorithm != "pairwise":
        raise UserError(f"--{'export_pairs' if args.export_pairs else 'pair_labels'} is for --algorithm pairwise")
    if args.export_pairs and args.pair_labels:
        raise UserError("--export_pairs samples new pairs, --pair_labels trains on labelled ones: use one per run")
    per_epoch = args.sample_batch_size * args.sample_batches_per_epoch * args.group_size
    if per_epoch % args.train_batch_size:
        raise UserError(f"--train_batch_size {args.train_batch_size} must divide the {per_epoch} samples per epoch per process "
                        "(sample_batch_size x sample_batches_per_epoch x group_size)")
    train_batches = args.num_inner_epochs * per_epoch // args.train_batch_size
    if train_batches % args.gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide the {train_batches} training "
                        "batches of an epoch (num_inner_epochs x samples per epoch / train_batch_size): updates never span epochs")
