"""Pairwise RL with people in the loop (train_RORem_ddpo.py --algorithm pairwise): --export_pairs
writes an epoch's pairs for labelling (images, trajectories, pairs.json), --pair_labels trains one
epoch on the labelled pairs. The sampling and the policy update are rl_loop.py's."""
import json
import os

import numpy as np
import torch

from myutils.data import to_device
from myutils.errors import UserError

from . import validation

PAIR_LABELS = {"a": 1.0, "b": -1.0, "tie": 0.0, None: 0.0}  # per-pair preference of the first sample (a)
SAMPLER_SETTINGS = ("family", "sample_steps", "strength", "eta", "noise_level", "naive_sde", "resolution", "guidance_scale",
                    "flow_guidance", "group_size", "sample_batch_size", "sample_batches_per_epoch", "seed")


def export_pairs(args, accelerator, sampler, entries, batches, all_rewards, global_step):
    """--export_pairs DIR: write the epoch's pairs for labelling. Per process trajectories-rankR.pt
    (the recorded latents, log-probs and conditioning); per pair pair-K.png (source | mask | a | b);
    DIR/pairs.json with the policy's step, the sampler settings and one entry per pair, label null."""
    from accelerate.utils import gather_object

    from myutils.img_util import tensor_to_pil

    out = args.export_pairs
    os.makedirs(out, exist_ok=True)
    rank = accelerator.process_index
    torch.save([{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches],
               os.path.join(out, f"trajectories-rank{rank}.pt"))
    index = torch.cat([b["index"] for b in batches]).cpu()
    n_local = len(index) // 2
    rewards = all_rewards[rank * 2 * n_local:(rank + 1) * 2 * n_local]
    rows, p = [], 0
    for b in batches:
        pixels = sampler.decode(b["latents"][:, -1]).cpu()
        for i in range(0, len(pixels), 2):
            k = rank * n_local + p
            source, mask = (row[0] for row in validation.input_rows([{"source": b["source"][i], "mask": b["mask"][i]}]))
            validation.viewable_grid([[source, mask, tensor_to_pil(pixels[i]), tensor_to_pil(pixels[i + 1])]], args.resolution).save(
                os.path.join(out, f"pair-{k:05d}.png"))
            e = entries[int(index[2 * p])]
            rows.append({"pair": k, "image": f"pair-{k:05d}.png", "source": e.paths["source"], "mask": e.paths["mask"],
                         "reward_a": float(rewards[2 * p]), "reward_b": float(rewards[2 * p + 1]), "label": None})
            p += 1
    rows = sorted(gather_object(rows), key=lambda r: r["pair"])
    if accelerator.is_main_process:
        doc = {"global_step": global_step, "num_processes": accelerator.num_processes,
               "sampler": {k: getattr(args, k) for k in SAMPLER_SETTINGS},
               "how_to_label": "python annotate_RORem.py --pairs_path <this folder> --annotator NAME (keys a, b, t, s), or by hand: "
                               "each image is source | mask | a | b: set label to \"a\" or \"b\" (preferred), \"tie\" or null "
                               "(no preference); then train with --pair_labels <the labelled file> --resume_from_checkpoint latest",
               "pairs": rows}
        with open(os.path.join(out, "pairs.json"), "w") as f:
            json.dump(doc, f, indent=1)
    accelerator.wait_for_everyone()


def load_labelled_pairs(args, accelerator, global_step):
    """--pair_labels FILE: (this process's recorded batches, the rewards recorded at export (N,),
    per-sample preferences of all processes' samples (+1 preferred, -1 rejected, 0 no preference)).
    The pairs must have been sampled by the policy this run resumes (same step, same settings),
    so the recorded log-probs belong to it."""
    path = args.pair_labels
    try:
        with open(path) as f:
            doc = json.load(f)
        pairs = doc["pairs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pair_labels {path}: not a pairs.json written by --export_pairs ({e})")
    if doc.get("global_step") != global_step:
        raise UserError(f"--pair_labels {path}: the pairs were sampled by the policy at step {doc.get('global_step')}, but this "
                        f"run resumes at step {global_step}; resume the checkpoint they were exported from (--resume_from_checkpoint)")
    if doc.get("num_processes") != accelerator.num_processes:
        raise UserError(f"--pair_labels {path}: exported by {doc.get('num_processes')} processes; launch as many "
                        f"(now {accelerator.num_processes})")
    for k, v in doc.get("sampler", {}).items():
        if getattr(args, k, v) != v:
            raise UserError(f"--pair_labels {path}: the pairs were sampled with --{k} {v}, this run has {getattr(args, k)}")
    prefs = []
    for i, pair in enumerate(pairs):
        label = pair.get("label") if isinstance(pair, dict) else "<not an object>"
        if label not in PAIR_LABELS:
            raise UserError(f"--pair_labels {path}: pairs[{i}] ({pair.get('image') if isinstance(pair, dict) else pair}): "
                            f"label must be \"a\", \"b\", \"tie\" or null, got {label!r}")
        prefs += [PAIR_LABELS[label], -PAIR_LABELS[label]]
    if not any(prefs):
        raise UserError(f"--pair_labels {path}: no pair is labelled \"a\" or \"b\"; nothing to train on")
    traj = os.path.join(os.path.dirname(path), f"trajectories-rank{accelerator.process_index}.pt")
    if not os.path.isfile(traj):
        raise UserError(f"--pair_labels {path}: {traj} is missing; keep the labels file in its --export_pairs folder")
    batches = [to_device(b, accelerator.device) for b in torch.load(traj, map_location="cpu", weights_only=False)]
    if sum(len(b["index"]) for b in batches) * accelerator.num_processes != len(prefs):
        raise UserError(f"--pair_labels {path}: {len(pairs)} pairs listed, but {traj} holds another number of samples per process")
    rewards = np.array([r for pair in pairs for r in (pair.get("reward_a", np.nan), pair.get("reward_b", np.nan))], dtype=np.float64)
    return batches, rewards, np.array(prefs)
