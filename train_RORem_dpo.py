#!/usr/bin/env python
"""Diffusion-DPO for the RORem remover on preference pairs {"source", "mask", "preferred", "rejected"}.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_dpo.py \
        --pretrained_unet path/to/RORem_unet --preference_data pairs/meta.json --beta 5000 --use_lora \
        --output_dir experiment/RORem_DPO --max_train_steps 2000 --report_to wandb

Per step: both images of a pair get the same crop/flip, the same noise and the same timestep; the
policy and the reference predict on [preferred..., rejected...]; the loss is myutils/dpo_utils.py's.
The reference is the same UNet with its LoRA adapters disabled (no second UNet in memory), or a
frozen copy in the compute dtype for a full fine-tune. --loss_type sft trains on the preferred
images only (the supervised baseline).

Beta units: --beta multiplies errors averaged over latent elements (the paper's unit: about 5000 at
SDXL scale). --beta_unit sum takes the research plan's unit (errors summed over elements: 0.1 ... 2.0)
and converts it (beta_mean = beta_sum * C * H * W of the latents).

--safeguard_mu: Diffusion-SDPO (AIDC-AI/Diffusion-SDPO), against the failure users report most with
Diffusion-DPO, the loss falling while samples get worse because the preferred images' error rises
along with the rejected ones'. Each step scales the rejected half's gradient by lambda in [0, 1],
chosen so that to first order the preferred error falls (myutils/dpo_utils.py); the ratio is taken
over the global batch (every rank). The official SDXL example uses mu 0.6.
"""
import argparse

from myutils.args import FRACTION, NONNEGATIVE, POSITIVE_REAL
from myutils.dpo_utils import LOSS_TYPES, beta_at, beta_in_mean_units, diffusion_dpo_loss, sft_loss, winner_preserving_scale
from myutils.errors import UserError, run_cli
from myutils.models import load_unet_weights, save_unet
from myutils.reward_utils import TRAINING_FLAGS, load_reward_model
from training import checkpoint, config, loop, preference, prepare, validation
from training.preference import pair_inputs, reference_prediction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="pair", meta_aliases=("--preference_data",))
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=POSITIVE_REAL, default=5000.0)
    g.add_argument("--beta_unit", choices=["mean", "sum"], default="mean", help="what --beta multiplies (see the top)")
    g.add_argument("--beta_end", type=POSITIVE_REAL, default=None, help="with --beta_schedule linear or cosine")
    g.add_argument("--beta_schedule", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--loss_type", choices=list(LOSS_TYPES) + ["sft"], default="sigmoid")
    g.add_argument("--safeguard_mu", type=FRACTION, default=None,
                   help="Diffusion-SDPO: scale the rejected half's gradient so the preferred error falls (off by default; see the top)")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None,
                   help="a discriminator folder: validation also reports the win rate of policy vs reference")
    g.add_argument("--win_rate_samples", type=NONNEGATIVE, default=64, help="held-out inputs for the win rate")
    parser.set_defaults(learning_rate=2.048e-5, validation_steps=0)
    args = config.parse_args(parser, argv)
    if (args.beta_schedule != "constant") != (args.beta_end is not None):  # one without the other does nothing
        raise UserError(f"--beta_schedule {args.beta_schedule} and --beta_end {args.beta_end}: a linear or cosine schedule needs "
                        "--beta_end, and --beta_end needs one")
    if args.safeguard_mu is not None and args.loss_type == "sft":
        raise UserError("--safeguard_mu scales the rejected half's gradient; --loss_type sft has no rejected half")
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = prepare.make_accelerator(args)
    entries, val_entries = prepare.load_train_and_validation(args, "pair", accelerator)
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype)
    unet = comps.unet
    ref_unet, params = preference.policy_and_reference(unet, args, dtype, accelerator.device)

    dataset = prepare.make_train_dataset(args, entries, "pair", accelerator, comps.vae, cache_keys=("preferred", "rejected", "masked"))
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, unet, params, dataset)
    save = lambda m, d: save_unet(m, d, args.use_lora)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, lambda m, d: load_unet_weights(m, d, args.use_lora))
    prepare.init_trackers(accelerator, args, "train_RORem_dpo")
    validating = args.validation_steps and accelerator.is_main_process
    reward = (load_reward_model(args.pretrained_model_name_or_path, args.discriminator_path, args.resolution, accelerator.device,
                                dtype, args.variant, flags=TRAINING_FLAGS) if validating and args.discriminator_path else None)
    count = max(args.win_rate_samples, args.num_validation_images) if reward else None
    val_samples = validation.validation_samples(args, val_entries, "pair", count) if validating else []
    reference = {}  # the reference's results and scores: the same at every validation
    latent_shape = None

    def validate(step):
        return preference.validate_against_reference(accelerator, args, comps, unet, ref_unet, val_samples, reward, reference, step)

    global_step, final = checkpoint.resume(accelerator, args, "train_RORem_dpo.py", "remover"), None
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            x, t, target, kw = pair_inputs(comps, batch, args.resolution, args.seed)
            latent_shape = latent_shape or tuple(target.shape[1:])
            pred = unet(x, t, **kw).sample
            if args.loss_type == "sft":
                loss, metrics = sft_loss(pred, target), {}
            else:
                beta = beta_in_mean_units(beta_at(run.global_step, max_steps, args.beta, args.beta_end, args.beta_schedule),
                                          latent_shape, args.beta_unit)
                ref = reference_prediction(accelerator.unwrap_model(unet), ref_unet, x, t, kw)
                scale = None if args.safeguard_mu is None else winner_preserving_scale(
                    pred, target, args.safeguard_mu, reduce_sum=lambda s: accelerator.reduce(s, reduction="sum"))
                loss, metrics = diffusion_dpo_loss(pred, ref, target, beta, args.loss_type, loser_scale=scale)
                metrics["beta"] = beta
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params)
        if run.end_of_step(**metrics) and args.validation_steps and run.global_step % args.validation_steps == 0:
            final = validate(run.global_step)
    run.finish()
    if args.validation_steps and (final is None or run.global_step % args.validation_steps):
        final = validate(run.global_step)  # unless this very step was just validated
    checkpoint.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
