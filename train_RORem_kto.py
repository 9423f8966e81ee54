#!/usr/bin/env python
"""Diffusion-KTO for the RORem remover on scored triplets {"source", "mask", "GT": result, "score": 0/1}.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_kto.py --config configs/kto_config.yaml \
        --pretrained_unet path/to/RORem_unet --meta_path scored/meta.json --use_lora --output_dir experiment/RORem_KTO

RORem's people gave one verdict per result, good or bad: KTO (Li et al. 2024, "Aligning Diffusion
Models by Optimizing Human Utility") trains on exactly that, no pairs needed. Per sample, the policy
and the reference predict at the same noise and timestep; the implicit reward is the reference's
denoising error minus the policy's; the reference point is the batch mean of those rewards over every
rank, detached and clamped at 0; a good result (score >= 0.5) is pushed above it and a bad one below
(myutils/dpo_utils.py: diffusion_kto_loss). The reference is the same UNet with its LoRA adapters
off, or a frozen copy for a full fine-tune. --desirable_weight / --undesirable_weight weigh the two
classes (default auto: the rarer class weighted up so both count as much, the KTO paper's balance).

Validation matches train_RORem_dpo.py's, so the two compare in one table: preference accuracy on
held-out pairs (--validation_meta_path of preferred/rejected pairs: the KTO margin of the preferred
over the rejected), the masked MSE of policy and reference results against the preferred image (GT,
for natural pairs), and the discriminator's win rate of policy against reference.
"""
import argparse

from myutils.args import NONNEGATIVE, POSITIVE_REAL
from myutils.dpo_utils import diffusion_kto_loss, kto_class_weights
from myutils.errors import UserError, run_cli
from myutils.models import load_unet_weights, save_unet
from myutils.reward_utils import TRAINING_FLAGS, load_reward_model
from myutils.sdxl_inpaint import noised_inputs
from training import checkpoint, config, loop, preference, prepare, validation
from training.preference import reference_prediction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="scored")
    g = parser.add_argument_group("KTO")
    g.add_argument("--beta", type=POSITIVE_REAL, default=5000.0, help="multiplies the implicit reward (mean-error units, as DPO's)")
    g.add_argument("--desirable_weight", type=POSITIVE_REAL, default=None, help="lambda_D (default: auto, see the top)")
    g.add_argument("--undesirable_weight", type=POSITIVE_REAL, default=None, help="lambda_U (default: auto)")
    g.add_argument("--discriminator_path", "--RORem_discriminator", default=None,
                   help="a discriminator folder: validation also reports the win rate of policy vs reference")
    g.add_argument("--win_rate_samples", type=NONNEGATIVE, default=64, help="held-out inputs for the win rate")
    parser.set_defaults(learning_rate=1e-5, validation_steps=0)
    return config.parse_args(parser, argv)


def class_weights(args, entries):
    """(lambda_D, lambda_U): as given, or balanced from the training set's label counts."""
    good = sum(e.score >= 0.5 for e in entries)
    if not good or good == len(entries):
        raise UserError(f"--meta_path: KTO needs good and bad results; all {len(entries)} entries are "
                        f"{'good' if good else 'bad'} (score {'>=' if good else '<'} 0.5)")
    auto_d, auto_u = kto_class_weights(good, len(entries) - good)
    return args.desirable_weight or auto_d, args.undesirable_weight or auto_u


def main(argv=None):
    args = parse_args(argv)
    accelerator = prepare.make_accelerator(args)
    entries, val_entries = prepare.load_train_and_validation(args, "scored", accelerator, validation_kind="pair")
    val_entries = val_entries if args.validation_meta_path else []  # validation needs held-out pairs
    lambda_d, lambda_u = class_weights(args, entries)
    dtype = prepare.weight_dtype(accelerator)
    comps = prepare.Components(args, accelerator, dtype)
    unet = comps.unet
    ref_unet, params = preference.policy_and_reference(unet, args, dtype, accelerator.device)

    dataset = prepare.make_train_dataset(args, entries, "scored", accelerator, comps.vae, cache_keys=("GT", "masked"))
    unet, optimizer, lr_scheduler, loader, max_steps, num_epochs = prepare.for_training(args, accelerator, unet, params, dataset)
    save = lambda m, d: save_unet(m, d, args.use_lora)  # noqa: E731
    checkpoint.register_hooks(accelerator, save, lambda m, d: load_unet_weights(m, d, args.use_lora))
    prepare.init_trackers(accelerator, args, "train_RORem_kto")
    validating = args.validation_steps and accelerator.is_main_process and val_entries
    reward = (load_reward_model(args.pretrained_model_name_or_path, args.discriminator_path, args.resolution, accelerator.device,
                                dtype, args.variant, flags=TRAINING_FLAGS) if validating and args.discriminator_path else None)
    count = max(args.win_rate_samples, args.num_validation_images) if reward else None
    val_samples = validation.validation_samples(args, val_entries, "pair", count) if validating else []
    reference = {}

    def validate(step):
        return preference.validate_against_reference(accelerator, args, comps, unet, ref_unet, val_samples, reward, reference, step)

    def global_mean(x):
        return accelerator.reduce(x.reshape(1), reduction="mean")[0]  # the reference point over every rank's batch

    global_step, final = checkpoint.resume(accelerator, args, "train_RORem_kto.py", "remover"), None
    prepare.logger.info("%d scored results (%d good), lambda_D %.3f, lambda_U %.3f", len(entries),
                        sum(e.score >= 0.5 for e in entries), lambda_d, lambda_u)
    run = loop.TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
    for batch in run.batches():
        with accelerator.accumulate(unet):
            x, t, target, kw = noised_inputs(comps.noise_scheduler, comps.vae, comps.condition, batch, args.resolution, args.seed)
            pred = unet(x, t, **kw).sample
            ref = reference_prediction(accelerator.unwrap_model(unet), ref_unet, x, t, kw)
            labels = (batch["score"] >= 0.5).to(pred.device)
            loss, metrics = diffusion_kto_loss(pred, ref, target, labels, args.beta, lambda_d, lambda_u, reduce_mean=global_mean)
            if run.record_loss(loss):
                accelerator.backward(loss)
            run.optimizer_step(optimizer, lr_scheduler, params)
        if run.end_of_step(**metrics) and args.validation_steps and run.global_step % args.validation_steps == 0:
            final = validate(run.global_step)
    run.finish()
    if args.validation_steps and (final is None or run.global_step % args.validation_steps):
        final = validate(run.global_step)
    checkpoint.save_final(accelerator, args, unet, save, metrics=final)
    return final


if __name__ == "__main__":
    run_cli(main)
