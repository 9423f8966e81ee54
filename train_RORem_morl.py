#!/usr/bin/env python
"""Multi-objective online RL for the RORem remover (PGMORL, Xu et al. 2020, on GRPO): a population of
LoRA policies over one frozen base model, each trained on its own weights over several rewards, a
Pareto archive of what they reach, and the front's hypervolume per generation.

    accelerate launch --config_file configs/accelerate_8gpu.yaml train_RORem_morl.py --config configs/morl_config.yaml \
        --pretrained_unet path/to/RORem_unet --meta_path inputs/meta.json --discriminator_path path/to/disc \
        --objectives discriminator,preserve --population 6 --output_dir experiment/RORem_MORL

Each generation, every population slot trains --epochs_per_generation GRPO epochs (the sampling and
policy-gradient pass of training/rl_loop.py, with that slot's LoRA active) on the advantage
sum_j w_j x (reward j normalised within each input's group), so weights do not depend on the
rewards' units. Every slot is then evaluated on held-out inputs (deterministic sampler, fixed
noises, the mean of each objective) and offered to the Pareto archive. The first
--warmup_generations keep the initial evenly spread weights. After them, each generation records the
improvement every slot made under its weights, predicts the improvement of every (policy, candidate
weight) task and greedily picks the tasks that maximise hypervolume - --sparsity_weight x sparsity
of the predicted front (myutils/morl_utils.py); slot k continues from its task's parent LoRA with
the task's weights and a fresh optimizer state. Works for SDXL and FLUX-Fill models alike.

Output: policy_<k>/ (the final population) and archive/<name>/ (every policy on the front), each a
LoRA that diffusers loads; policies.json (weights, objectives, on the front or not); front plots
per generation (fronts/gen-XX.png) and at the end (front.png); hypervolume and sparsity per
generation in tensorboard and final_metrics.json. With --test_meta_path, the start and the front are
evaluated once more at the end on inputs the selection never saw, each objective per input (a paired
comparison of the front's hypervolume with the start's, e.g. by bootstrap over the inputs).
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil

import numpy as np
import torch

from myutils import morl_utils as mo
from myutils.args import NONNEGATIVE, NONNEGATIVE_REAL, POSITIVE
from myutils.errors import UserError, run_cli
from myutils.models import load_unet_weights, save_unet
from myutils.reward_utils import REWARDS
from myutils.rl_utils import clip_advantages, group_advantages
from training import adapters, checkpoint, config, loop, prepare, rl_loop, validation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_common_args(parser, meta_kind="input")
    config.add_rl_args(parser)
    g = parser.add_argument_group("multi-objective (PGMORL)")
    g.add_argument("--objectives", default="", help="comma-separated rewards to trade off, e.g. discriminator,preserve")
    g.add_argument("--population", type=POSITIVE, default=6, help="LoRA policies trained side by side on one base model")
    g.add_argument("--generations", type=POSITIVE, default=6, help="in all, warm-up included")
    g.add_argument("--warmup_generations", type=NONNEGATIVE, default=2, help="generations with the initial weights")
    g.add_argument("--epochs_per_generation", type=POSITIVE, default=1)
    g.add_argument("--weight_partitions", type=POSITIVE, default=10, help="candidate weights: simplex lattice with this many steps")
    g.add_argument("--sparsity_weight", type=NONNEGATIVE_REAL, default=0.5, help="task selection maximises HV - this x sparsity (scaled units)")
    g.add_argument("--hv_reference", default=None,
                   help="comma-separated reference point of the hypervolume (default: the start minus half its size, minus 1e-3)")
    g.add_argument("--test_meta_path", nargs="+", default=None,
                   help="held-out inputs never used to choose the front: at the end the start and every policy on the front are "
                        "evaluated there, per input (policies.json 'test'), free of the optimism of a front picked on the "
                        "validation inputs")
    g.add_argument("--test_samples", type=POSITIVE, default=None, help="the first this many test inputs (default: all)")
    parser.set_defaults(use_lora=True, algorithm="grpo", group_size=4, learning_rate=3e-4, train_batch_size=4, validation_steps=0,
                        checkpointing_steps=0, eval_samples=32)
    args = config.parse_args(parser, argv)
    args.objective_names = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in args.objective_names if o not in REWARDS]
    if unknown or len(args.objective_names) < 2:
        raise UserError(f"--objectives {args.objectives!r}: give at least two of {', '.join(REWARDS)}"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    args.reward = ",".join(f"{o}=1" for o in args.objective_names)  # every component is computed; the weights are per policy
    config.check_rl_args(args, "train_RORem_morl.py")
    if args.algorithm != "grpo":
        raise UserError("train_RORem_morl.py normalises each objective within groups: use --algorithm grpo")
    if args.population < 2 or not 0 < args.warmup_generations <= args.generations:
        raise UserError("--population must be at least 2 and 0 < --warmup_generations <= --generations")
    if args.hv_reference is not None:
        try:
            args.hv_reference = [float(v) for v in args.hv_reference.split(",")]
        except ValueError:
            raise UserError(f"--hv_reference {args.hv_reference!r}: not comma-separated numbers") from None
        if len(args.hv_reference) != len(args.objective_names):
            raise UserError(f"--hv_reference needs {len(args.objective_names)} values, one per objective")
    return args


def weighted_group_advantages(components, names, weights, ids, std="group"):
    """sum_j w_j x GRPO advantage of objective j (each normalised within its input's group)."""
    return sum(w * group_advantages(components[n], ids, std) for n, w in zip(names, weights))


class Population:
    """What the evolutionary loop keeps between generations (checkpointed with the weights)."""

    def __init__(self, weights):
        self.weights = [list(map(float, w)) for w in weights]
        self.parents = list(range(len(weights)))
        self.objectives = None  # per slot, after the last evaluation
        self.reference, self.start = None, None
        self.records, self.history = [], []
        self.archive = mo.ParetoArchive()

    def state_dict(self):
        return {k: v for k, v in vars(self).items() if k != "archive"} | {"archive": self.archive.state_dict()}

    def load_state_dict(self, state):
        for k, v in state.items():
            if k == "archive":
                self.archive.load_state_dict(v)
            else:
                setattr(self, k, v)


def copy_adapters(model, assignments):
    """Slot k takes the LoRA weights of slot assignments[k] (read all first: slots may swap)."""
    params = dict(model.named_parameters())
    snapshot = {name: p.detach().clone() for name, p in params.items() if "lora_" in name}
    for child, parent in enumerate(assignments):
        for name, value in snapshot.items():
            if f".policy_{parent}." in name:
                params[name.replace(f".policy_{parent}.", f".policy_{child}.")].data.copy_(value)


def plot_front(path, names, population_points, archive_points, start, predicted=None, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    if len(archive_points):
        front = archive_points[np.argsort(archive_points[:, 0])]
        ax.step(front[:, 0], front[:, 1], where="post", color="C0", alpha=0.5)
        ax.scatter(front[:, 0], front[:, 1], s=60, facecolors="none", edgecolors="C0", label="Pareto archive")
    ax.scatter(population_points[:, 0], population_points[:, 1], c="C1", s=18, label="population")
    ax.scatter([start[0]], [start[1]], marker="*", c="k", s=80, label="start (LoRA off)")
    if predicted is not None and len(predicted):
        ax.scatter(predicted[:, 0], predicted[:, 1], marker="x", c="C2", s=25, label="predicted (next tasks)")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    user_accumulation = args.gradient_accumulation_steps
    args.gradient_accumulation_steps = user_accumulation * rl_loop.train_timesteps(args)
    accelerator = prepare.make_accelerator(args, find_unused_parameters=True)
    kind = "triplet" if "gt" in args.rewards else "input"
    entries, val_entries = prepare.load_train_and_validation(args, kind, accelerator)
    dtype = prepare.weight_dtype(accelerator)
    sampler = rl_loop.load_sampler(args, accelerator, dtype)
    model = sampler.model
    slots = [f"policy_{k}" for k in range(args.population)]
    params = [adapters.add_lora(model, args, dtype, adapter_name=name) for name in slots]  # one base, one LoRA per policy
    for p in sum(params, []):
        p.requires_grad_(True)  # the active adapter decides what a forward uses; DDP sees all of them
    reward_model = rl_loop.load_reward(args, accelerator, dtype)
    loader, steps_per_epoch = rl_loop.sampling_loader(args, entries, kind, accelerator, user_accumulation)
    steps_per_generation = steps_per_epoch * args.epochs_per_generation * args.population
    total_steps = steps_per_generation * args.generations
    optimizers = [prepare.make_optimizer(args, p, accelerator) for p in params]
    # each policy's schedule steps only while that policy trains: 1/population of all steps
    schedulers = [prepare.make_lr_scheduler(args, o, total_steps // args.population, accelerator) for o in optimizers]
    model, *rest = accelerator.prepare(model, *optimizers, *schedulers)
    optimizers, schedulers = rest[:args.population], rest[args.population:]
    raw = accelerator.unwrap_model(model)
    state = Population(mo.initial_weights(len(args.objective_names), args.population, args.seed))
    accelerator.register_for_checkpointing(state)

    def save_all(m, folder):
        for name in slots:
            save_unet(m, os.path.join(folder, name), lora=True, adapter=name)

    def load_all(m, folder):
        for name in slots:
            load_unet_weights(m, os.path.join(folder, name), lora=True, adapter=name)

    checkpoint.register_hooks(accelerator, save_all, load_all)
    prepare.init_trackers(accelerator, args, "train_RORem_morl")
    eval_samples = validation.validation_samples(args, val_entries, kind, args.eval_samples)  # every rank evaluates a share
    names = args.objective_names

    def activate(k):
        raw.set_adapter(slots[k])
        for p in sum(params, []):
            p.requires_grad_(True)

    def objectives_per_input(samples, adapter=None):
        """Objective vector of each sample under one slot (None: the base model); the ranks share the
        work and all get the same numbers, so all make the same choices."""
        raw.eval()
        if adapter is not None:
            activate(adapter)
        with adapters.disabled(raw) if adapter is None else contextlib.nullcontext():
            per_sample = rl_loop.evaluate(raw, sampler, args, samples, reward_model, full=False, accelerator=accelerator)[2]
        return [[p[n] for n in names] for p in per_sample]

    def evaluate_objectives(adapter=None):
        """Held-out objective vector (means over the validation inputs) of one slot."""
        return np.mean(objectives_per_input(eval_samples, adapter), axis=0).tolist()

    global_step = checkpoint.resume(accelerator, args, "train_RORem_morl.py", "remover")
    first_generation = global_step // steps_per_generation
    stream = prepare.epoch_batches(loader, rl_loop.first_sampled_epoch(global_step, steps_per_epoch) * args.sample_batches_per_epoch,
                              1, 10 ** 9)
    run = loop.TrainingRun(accelerator, args, None, total_steps, args.generations, global_step)
    if state.start is None:
        state.start = evaluate_objectives()
        state.objectives = [state.start] * args.population
        state.reference = args.hv_reference or [s - 0.5 * abs(s) - 1e-3 for s in state.start]
    os.makedirs(os.path.join(args.output_dir, "fronts"), exist_ok=True)
    # ended on every way out (a failure too): no reward thread outlives the run
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        id_cache = {}
        for gen in range(first_generation, args.generations):
            before = [list(o) for o in state.objectives]
            for k in range(args.population):  # 1. each slot trains on its own weights
                activate(k)
                for e in range(args.epochs_per_generation):
                    start_step = gen * steps_per_generation + (k * args.epochs_per_generation + e) * steps_per_epoch
                    if run.global_step >= start_step + steps_per_epoch:
                        continue  # trained before the run was resumed
                    raw.eval()
                    if run.global_step > start_step:  # resumed inside this epoch: its samples and advantages as they were
                        batches, advantages, logs = rl_loop.load_epoch_samples(args, accelerator, start_step)
                    else:
                        batches, _, components = rl_loop.collect_samples(args, sampler, raw, stream, pool, reward_model,
                                                                         accelerator.device)
                        ids = accelerator.gather(torch.cat([rl_loop.content_ids(entries, b["index"].cpu(), id_cache)
                                                            for b in batches]).to(accelerator.device)).cpu().tolist()
                        every = {n: accelerator.gather(components[n].to(accelerator.device)).cpu().numpy() for n in names}
                        adv = clip_advantages(weighted_group_advantages(every, names, state.weights[k], ids, args.adv_std),
                                              args.adv_clip_max)
                        n_local = len(components[names[0]])
                        mine = slice(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
                        advantages = torch.tensor(adv[mine], dtype=torch.float32, device=accelerator.device)
                        logs = {"generation": gen, "policy": k,
                                **{f"policy_{k}/reward_{n}_mean": float(every[n].mean()) for n in names}}
                    seed = (args.seed * 7919 + gen) * 1009 + k * 31 + e
                    rl_loop.policy_update(args, accelerator, run, model, sampler, batches, advantages, optimizers[k],
                                          schedulers[k], params[k], seed, logs, start_step)
            # 2. evaluate every slot; the archive keeps the non-dominated ones
            state.objectives = [evaluate_objectives(k) for k in range(args.population)]
            for k in range(args.population):
                state.records.append({"policy": k, "weights": state.weights[k],
                                      "delta": [a - b for a, b in zip(state.objectives[k], before[k])], "generation": gen})
                entry = {"name": f"gen{gen:02d}_policy{k}", "weights": state.weights[k], "objectives": state.objectives[k],
                         "generation": gen, "slot": k}
                added, removed = state.archive.add(entry)
                if accelerator.is_main_process:
                    if added:
                        save_unet(raw, os.path.join(args.output_dir, "archive", entry["name"]), lora=True, adapter=slots[k])
                        checkpoint.write_record(os.path.join(args.output_dir, "archive", entry["name"]),
                                                checkpoint.read_record(args.output_dir))
                    for name in removed:
                        shutil.rmtree(os.path.join(args.output_dir, "archive", name), ignore_errors=True)
            points = state.archive.points
            hv, sp = mo.hypervolume(points, state.reference), mo.sparsity(points)
            trained = [{"weights": list(w), "objectives": list(o)} for w, o in zip(state.weights, state.objectives)]
            # 3. after the warm-up: pick (parent, weights) tasks for the next generation
            predicted = None
            if gen + 1 >= args.warmup_generations and gen + 1 < args.generations:
                lattice = mo.candidate_weights(len(names), args.weight_partitions)
                candidates = [(k, w, np.asarray(state.objectives[k]) + mo.predict_improvement(state.records, k, w))
                              for k in range(args.population) for w in lattice]
                tasks = mo.select_tasks(points, candidates, args.population, state.reference, args.sparsity_weight)
                predicted = np.array([t[2] for t in tasks])
                copy_adapters(raw, [t[0] for t in tasks])
                for k, (parent, w, _) in enumerate(tasks):
                    state.objectives[k], state.weights[k] = list(state.objectives[parent]), [float(x) for x in w]
                    state.parents[k] = parent
                for o in optimizers:  # a new task: fresh Adam moments
                    getattr(o, "optimizer", o).state.clear()
            state.history.append({"generation": gen, "hypervolume": hv, "sparsity": sp, "front_size": len(points),
                                  "population": trained,
                                  "next_tasks": [{"parent": p, "weights": w} for p, w in zip(state.parents, state.weights)]})
            accelerator.log({"hypervolume": hv, "sparsity": sp, "front_size": len(points)}, step=run.global_step)
            if accelerator.is_main_process:
                pop = np.array([e["objectives"] for e in trained])
                if len(names) == 2:
                    plot_front(os.path.join(args.output_dir, "fronts", f"gen-{gen:02d}.png"), names, pop, points, state.start,
                               predicted, f"generation {gen}: hypervolume {hv:.4g}, {len(points)} on the front")
            checkpoint.save_checkpoint(accelerator, args, run.global_step)
    run.finish()
    test = None
    if args.test_meta_path:  # the start and the front on inputs the selection never saw
        accelerator.wait_for_everyone()  # the archive's LoRAs are on disk
        test_entries = prepare.load_entries(args.test_meta_path, kind, accelerator, what="--test_meta_path", output_dir=args.output_dir)
        samples = validation.validation_samples(args, test_entries, kind, args.test_samples or len(test_entries))
        keep = {n: p.detach().clone() for n, p in raw.named_parameters() if f".{slots[0]}." in n}  # slot 0 lends its adapter
        test = {"inputs": len(samples), "start": objectives_per_input(samples), "front": {}}
        for e in state.archive.entries:
            load_unet_weights(raw, os.path.join(args.output_dir, "archive", e["name"]), lora=True, adapter=slots[0])
            test["front"][e["name"]] = objectives_per_input(samples, 0)
        with torch.no_grad():
            for n, p in raw.named_parameters():
                if n in keep:
                    p.copy_(keep[n])
    return write_outputs(accelerator, args, raw, state, slots, names, test)


def write_outputs(accelerator, args, raw, state, slots, names, test=None):
    """The final population and the archive as LoRAs with an index; the front plot; final metrics;
    with a test set, each objective per test input of the start and of every policy on the front."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    front = {e["name"] for e in state.archive.entries}
    record = checkpoint.read_record(args.output_dir)
    index = []
    for k, name in enumerate(slots):
        folder = os.path.join(args.output_dir, name)
        save_unet(raw, folder, lora=True, adapter=name)
        checkpoint.write_record(folder, record)  # each policy is a remover LoRA of this run
        index.append({"name": name, "path": folder, "weights": state.weights[k], "objectives": state.objectives[k],
                      "on_front": not any(mo.dominates(e["objectives"], state.objectives[k]) for e in state.archive.entries)})
    for e in state.archive.entries:
        index.append({"name": e["name"], "path": os.path.join(args.output_dir, "archive", e["name"]), "weights": e["weights"],
                      "objectives": e["objectives"], "on_front": e["name"] in front, "generation": e["generation"]})
    hv = [h["hypervolume"] for h in state.history]
    summary = {"objectives": names, "reference": state.reference, "start": state.start, "hypervolume_per_generation": hv,
               "sparsity_per_generation": [h["sparsity"] for h in state.history], "policies": index}
    if test is not None:
        means = [np.mean(v, axis=0) for v in test["front"].values()]
        test.update(hypervolume_start=mo.hypervolume([np.mean(test["start"], axis=0)], state.reference),
                    hypervolume_front=mo.hypervolume(means, state.reference))
        summary["test"] = test
    with open(os.path.join(args.output_dir, "policies.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if len(names) == 2:
        plot_front(os.path.join(args.output_dir, "front.png"), names, np.array(state.objectives), state.archive.points, state.start,
                   title=f"final: hypervolume {hv[-1]:.4g} (generation 0: {hv[0]:.4g})")
    metrics = {"hypervolume": hv[-1], "hypervolume_first_generation": hv[0], "front_size": len(state.archive.entries)}
    with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
        json.dump({"metrics": metrics, "history": state.history}, f, indent=1)
    return summary


if __name__ == "__main__":
    run_cli(main)
