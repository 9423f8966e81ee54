#!/usr/bin/env python
"""One round of RORem's data loop: remove, score, accept, annotate the doubtful, write the next data.

    # 1. run the remover over new (source, mask) inputs on every GPU, score each result with the
    #    discriminator, accept the confident ones, and send the uncertain band plus a random audit
    #    sample to annotation
    accelerate launch --num_processes 8 scripts/data_round.py --round_dir rounds/r1 --inputs_meta new/meta.json \
        --train_meta data/meta.json --RORem_unet path/to/RORem_unet --RORem_discriminator path/to/disc
    # 2. people label rounds/r1/annotate/meta.json (python annotate_RORem.py --meta_path rounds/r1/annotate)
    # 3. the same command again: finishes the round (rounds/r1/train/meta.json, report.md)

Every step is resumable: each result is a file (a rerun skips those that exist), each rank's scores
are kept, the annotation set is chosen once (seeded), labels are the annotators' journals. The round's
settings are recorded in round.json; a rerun with other settings or inputs is refused.

Decisions, with the discriminator's score s: accepted if s >= --accept, rejected if s < --reject, else
uncertain. Annotation gets every uncertain result and --audit_fraction of the confident ones (at
least one of each kind, if any). People's verdicts (the majority of the annotators who labelled an item;
a tie settles nothing) override the discriminator. The next training meta.json is the previous one
(--train_meta) plus (source, mask, GT = result) for each result accepted and not overruled, or labelled
good. The report gives the counts, the success rate (accepted share of the inputs, as RORem measures
a remover), and people's agreement with the discriminator on the audit sample (the unbiased part).

--simulate_annotator gt labels the annotation set from the inputs' GT (masked error against the border
fill's, myutils.annotation.gt_label) under the name "simulated", through the same journal and files a
person's labels take: for toy rounds, where the known answer says also how good the accepted set is.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from myutils import annotation as ann  # noqa: E402
from myutils.args import FRACTION, POSITIVE, POSITIVE_REAL, SCORE  # noqa: E402
from myutils.data import Entry, read_meta  # noqa: E402
from myutils.errors import UserError, output_folder, run_cli  # noqa: E402
from pipelines.inpaint import add_remover_args, check_remover_args  # noqa: E402

SETTINGS = ("pretrained_model", "RORem_unet", "lora_path", "scheduler", "inference_steps", "strength", "guidance_scale",
            "prompt", "negative_prompt", "resolution", "seed", "RORem_discriminator", "accept", "reject", "audit_fraction")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_remover_args(p)
    p.add_argument("--round_dir", required=True)
    p.add_argument("--inputs_meta", required=True, help="meta.json of the round's new {source, mask} inputs (a GT is kept if given)")
    p.add_argument("--train_meta", default=None, help="the training meta.json so far: the next one starts from it")
    p.add_argument("--RORem_discriminator", required=True)
    p.add_argument("--accept", type=SCORE, default=0.7, help="score >= this: accepted without a person")
    p.add_argument("--reject", type=SCORE, default=0.3, help="score < this: rejected without a person")
    p.add_argument("--audit_fraction", type=FRACTION, default=0.05, help="of the accepted and of the rejected, sent to annotation")
    p.add_argument("--batch_size", type=POSITIVE, default=8)
    p.add_argument("--simulate_annotator", choices=["none", "gt"], default="none")
    p.add_argument("--ddp_timeout", type=POSITIVE_REAL, default=120.0,
                   help="minutes a rank waits for the others (NCCL's default is 10): covers one rank's share of the removals")
    args = p.parse_args(argv)
    check_remover_args(args)
    if args.reject > args.accept:
        raise UserError(f"--reject {args.reject} is above --accept {args.accept}")
    return args


def record_settings(args, entries, write=True):
    """round.json: the settings and inputs this round was made with; another run must match them.
    Every rank checks (so a mismatch stops them all with the same message); one writes."""
    path = os.path.join(args.round_dir, "round.json")
    mine = {"settings": {k: getattr(args, k) for k in SETTINGS}, "inputs": [e.paths["source"] for e in entries]}
    if os.path.isfile(path):
        with open(path) as f:
            made = json.load(f)
        changed = [k for k in SETTINGS if made["settings"].get(k) != mine["settings"][k]]
        if changed or made["inputs"] != mine["inputs"]:
            what = f"--{changed[0]} {made['settings'].get(changed[0])!r}" if changed else "other inputs"
            raise UserError(f"--round_dir {args.round_dir}: this round was made with {what}; finish it with the same command, "
                            "or start another round in another folder")
    elif write:
        ann.write_json_atomic(path, mine)


def result_path(args, i):
    return os.path.join(args.round_dir, "results", f"{i:06d}.png")


def share(todo, rank, world):
    """This rank's consecutive part of the work left (sizes differ by one at most)."""
    return todo[rank * len(todo) // world:(rank + 1) * len(todo) // world]


def generate(args, entries, todo, device, dtype):
    """This rank's removals (seed --seed + input index, so any split of the inputs gives the same results)."""
    from tqdm.auto import tqdm

    from myutils.img_util import load_image, load_mask
    from pipelines.inpaint import load_remover, remove_objects

    if not todo:
        return
    pipe, cond, uncond = load_remover(args, device, dtype)
    bar = tqdm(total=len(todo), desc="removing")
    k = 0
    while k < len(todo):  # batches of consecutive inputs of one size: input i gets seed --seed + i whatever the batch
        group, images = [todo[k]], [load_image(entries[todo[k]].paths["source"])]
        while len(group) < args.batch_size and k + len(group) < len(todo) and todo[k + len(group)] == group[-1] + 1:
            nxt = load_image(entries[todo[k + len(group)]].paths["source"])
            if nxt.size != images[0].size:
                break
            group.append(todo[k + len(group)])
            images.append(nxt)
        masks = [load_mask(entries[i].paths["mask"]) for i in group]
        for i, result in zip(group, remove_objects(pipe, cond, uncond, images, masks, args, args.seed + group[0])):
            tmp = result_path(args, i) + ".tmp.png"
            result.save(tmp)
            os.replace(tmp, result_path(args, i))  # a result on disk is whole
        bar.update(len(group))
        k += len(group)


def score(args, entries, todo, rank, device, dtype):
    """This rank's discriminator scores {input index: score}, added to scores/rank<r>.json."""
    from myutils.reward_utils import load_reward_model, score_entries

    path = os.path.join(args.round_dir, "scores", f"rank{rank}.json")
    if not todo:
        return
    reward = load_reward_model(args.pretrained_model, args.RORem_discriminator, args.resolution, device, dtype, args.variant,
                               flags=("--pretrained_model", "--RORem_discriminator"))
    triplets = [Entry(e.meta, e.index, {"source": e.paths["source"], "mask": e.paths["mask"], "GT": result_path(args, i)})
                for i, e in ((i, entries[i]) for i in todo)]
    mine_done = {}
    if os.path.isfile(path):
        with open(path) as f:
            mine_done = json.load(f)
    mine_done.update({str(i): s for i, s in zip(todo, score_entries(reward, triplets, args.resolution, args.batch_size))})
    ann.write_json_atomic(path, mine_done)


def read_scores(round_dir):
    scores = {}
    folder = os.path.join(round_dir, "scores")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                scores.update(json.load(f))
    return scores


def choose_annotation_set(args, entries, scores):
    """annotate/meta.json (once): every uncertain result and a seeded audit sample of the confident."""
    folder = os.path.join(args.round_dir, "annotate")
    path = os.path.join(folder, "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    rng = random.Random(args.seed)
    by = {"accepted": [], "uncertain": [], "rejected": []}
    for i in range(len(entries)):
        s = scores[str(i)]
        by["accepted" if s >= args.accept else "rejected" if s < args.reject else "uncertain"].append(i)
    audit = sorted(i for kind in ("accepted", "rejected") if by[kind]
                   for i in rng.sample(by[kind], max(1, round(args.audit_fraction * len(by[kind])))))
    chosen = [(i, "uncertain") for i in by["uncertain"]] + [(i, "audit") for i in audit]
    os.makedirs(folder, exist_ok=True)
    meta = [{**{k: v for k, v in entries[i].extra.items() if k not in ("score", "GT")},
             "source": entries[i].paths["source"], "mask": entries[i].paths["mask"], "GT": os.path.abspath(result_path(args, i)),
             "discriminator_score": scores[str(i)], "round_index": i, "why": why,
             **({"reference_GT": entries[i].extra["GT"]} if "GT" in entries[i].extra else {})}
            for i, why in sorted(chosen)]
    ann.write_json_atomic(path, meta)
    return meta


def known_label(args, entries, i):
    """The known answer for input i's result (1 good, 0 bad): its masked error against the input's GT
    against the border fill's (myutils.annotation.gt_label)."""
    from myutils.img_util import load_image, load_mask
    from myutils.metrics import border_fill, masked_mse

    e = entries[i]
    if "GT" not in e.extra:
        raise UserError(f"{e.where()}: --simulate_annotator gt needs each input's 'GT'")
    source, mask = load_image(e.paths["source"]), load_mask(e.paths["mask"])
    gt = load_image(os.path.join(os.path.dirname(os.path.abspath(e.meta)), e.extra["GT"]))
    return ann.gt_label(masked_mse(load_image(result_path(args, i)), gt, mask), masked_mse(border_fill(source, mask), gt, mask))


def simulate_annotator(args, entries, to_annotate):
    """The known answer's labels, given through the annotation journal under the name "simulated"."""
    folder = os.path.join(args.round_dir, "annotate")
    journal = ann.journal_path(os.path.join(folder, "annotations"), "simulated")
    given = ann.read_journal(journal)
    for item in to_annotate:
        key = ann.result_key(item["GT"], folder)
        if key not in given:
            ann.append_label(journal, key, "good" if known_label(args, entries, item["round_index"]) else "bad", "simulated")


def finish(args, entries, scores, to_annotate):
    """The next training meta.json and the round's report, once every item to annotate is settled;
    None (and what is missing) while annotation goes on."""
    folder = os.path.join(args.round_dir, "annotate")
    journals = ann.read_all_journals(os.path.join(folder, "annotations"))
    keys = {item["round_index"]: ann.result_key(item["GT"], folder) for item in to_annotate}
    settled, votes = ann.consensus(journals, keys.values())
    waiting = [i for i, k in keys.items() if votes[k] == 0]
    if waiting:
        return None, waiting
    verdict = {i: settled.get(k) for i, k in keys.items()}  # None: a tie, settles nothing
    decision = {}
    for i in range(len(entries)):
        s = scores[str(i)]
        machine = "accepted" if s >= args.accept else "rejected" if s < args.reject else "uncertain"
        human = verdict.get(i)
        keep = human == 1 if human is not None else machine == "accepted"
        decision[i] = {"score": s, "machine": machine, "human": human, "keep": keep}
    new = [{"source": entries[i].paths["source"], "mask": entries[i].paths["mask"], "GT": os.path.abspath(result_path(args, i)),
            "discriminator_score": d["score"], **({"human_score": d["human"]} if d["human"] is not None else {}),
            "round": os.path.basename(os.path.abspath(args.round_dir))} for i, d in decision.items() if d["keep"]]
    previous = []
    if args.train_meta:
        previous = [{**e.extra, **e.paths} for e in read_meta(args.train_meta, "triplet")]
    os.makedirs(os.path.join(args.round_dir, "train"), exist_ok=True)
    ann.write_json_atomic(os.path.join(args.round_dir, "train", "meta.json"), previous + new)
    report = round_report(args, entries, decision, to_annotate, journals, len(previous), len(new))
    ann.write_json_atomic(os.path.join(args.round_dir, "report.json"), report)
    with open(os.path.join(args.round_dir, "report.md"), "w") as f:
        f.write("\n".join(report_lines(report)) + "\n")
    return report, []


def round_report(args, entries, decision, to_annotate, journals, n_previous, n_new):
    from myutils.metrics import cohen_kappa

    n = len(entries)
    count = {k: sum(d["machine"] == k for d in decision.values()) for k in ("accepted", "uncertain", "rejected")}
    audit = [item["round_index"] for item in to_annotate if item["why"] == "audit"]
    pairs = [(decision[i]["human"], int(decision[i]["machine"] == "accepted")) for i in audit if decision[i]["human"] is not None]
    report = {"inputs": n, **count, "to_annotation": len(to_annotate), "audited": len(audit),
              "annotators": {name: len(labels) for name, labels in journals.items()},
              "human_good": sum(d["human"] == 1 for d in decision.values()),
              "human_bad": sum(d["human"] == 0 for d in decision.values()),
              "overruled": sum(d["machine"] == "accepted" and d["human"] == 0 for d in decision.values()),
              "rescued": sum(d["machine"] != "accepted" and d["human"] == 1 for d in decision.values()),
              "kept": n_new, "success_rate": n_new / n, "discriminator_success_rate": count["accepted"] / n,
              "audit_agreement": sum(h == m for h, m in pairs) / len(pairs) if pairs else None,
              "audit_kappa": cohen_kappa([h for h, _ in pairs], [m for _, m in pairs]) if pairs else None,
              "train_entries": n_previous + n_new, "previous_train_entries": n_previous}
    if args.simulate_annotator == "gt":  # the known answer for every result, not only the annotated ones
        truth = {i: known_label(args, entries, i) for i in range(len(entries))}
        kept = [i for i, d in decision.items() if d["keep"]]
        report["true_success_rate"] = sum(truth.values()) / n
        report["kept_precision"] = sum(truth[i] for i in kept) / len(kept) if kept else None
        report["good_results_kept"] = sum(truth[i] for i in kept) / max(1, sum(truth.values()))
    return report


def report_lines(r):
    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    lines = [f"# Data round: {r['inputs']} inputs", "",
             f"- discriminator: {r['accepted']} accepted, {r['uncertain']} uncertain, {r['rejected']} rejected "
             f"(success rate by the discriminator alone {pct(r['discriminator_success_rate'])})",
             f"- to annotation: {r['to_annotation']} ({r['uncertain']} uncertain, {r['audited']} audit); annotators: "
             + ", ".join(f"{k} ({v})" for k, v in r["annotators"].items()),
             f"- people: {r['human_good']} good, {r['human_bad']} bad; {r['overruled']} accepted results overruled, "
             f"{r['rescued']} rescued",
             f"- people vs the discriminator on the audit sample: agreement {pct(r['audit_agreement'])}, kappa "
             + ("-" if r["audit_kappa"] is None else f"{r['audit_kappa']:.3f}"),
             f"- kept: {r['kept']} (success rate {pct(r['success_rate'])}); next training data: {r['previous_train_entries']} + "
             f"{r['kept']} = {r['train_entries']} entries"]
    if "true_success_rate" in r:
        lines.append(f"- known answer: {pct(r['true_success_rate'])} of the results are good; {pct(r['kept_precision'])} of "
                     f"those kept are good; {pct(r['good_results_kept'])} of the good ones were kept")
    return lines


def main(argv=None):
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from myutils.models import resolve_device_dtype
    from training.prepare import load_entries

    args = parse_args(argv)
    # ranks on CPUs need it said (GPUs do not); ranks wait for each other over one share of the removals
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(minutes=args.ddp_timeout))
    rank, world = state.process_index, state.num_processes
    output_folder(os.path.join(args.round_dir, "results"), "--round_dir")
    entries = load_entries([args.inputs_meta], "input", state, what="--inputs_meta")  # checked shared out, one error for all
    record_settings(args, entries, write=state.is_main_process)
    os.makedirs(os.path.join(args.round_dir, "scores"), exist_ok=True)
    # the work left, as the main process sees it (a rerun skips what is on disk), split evenly: no rank
    # waits at a barrier while another works through a share the first had already done
    scores = read_scores(args.round_dir)
    left = [[i for i in range(len(entries)) if not os.path.isfile(result_path(args, i))],
            [i for i in range(len(entries)) if str(i) not in scores]]
    if world > 1:
        left = broadcast_object_list(left)
    # auto: this rank's own GPU (cuda:<local rank>) under accelerate launch, else the CPU
    device, dtype = resolve_device_dtype(str(state.device) if args.device == "auto" else args.device, args.dtype)
    generate(args, entries, share(left[0], rank, world), device, dtype)
    state.wait_for_everyone()  # every result on disk
    score(args, entries, share(left[1], rank, world), rank, device, dtype)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    scores = read_scores(args.round_dir)
    missing = [i for i in range(len(entries)) if str(i) not in scores]
    if missing:
        raise UserError(f"--round_dir {args.round_dir}: {len(missing)} results have no score (input {missing[0]} first); rerun")
    to_annotate = choose_annotation_set(args, entries, scores)
    if args.simulate_annotator == "gt":
        simulate_annotator(args, entries, to_annotate)
    report, waiting = finish(args, entries, scores, to_annotate)
    if report is None:
        meta = os.path.join(args.round_dir, "annotate", "meta.json")
        print(f"{len(waiting)} of {len(to_annotate)} results await a person's label: python annotate_RORem.py --meta_path {meta} "
              f"--annotator NAME; then rerun this command to finish the round")
        return {"waiting": len(waiting)}
    print("\n".join(report_lines(report)))
    return report


if __name__ == "__main__":
    run_cli(main)
