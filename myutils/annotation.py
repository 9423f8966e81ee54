"""People's labels: an append-only journal per annotator, the files the training scripts read, and
agreement between annotators and with the discriminator (annotate_RORem.py, scripts/data_round.py).

A journal line is one label as it was given: {"item", "label", "annotator", "time"}; the last line
for an item wins (relabelling appends). A line torn by a crash or a full disk is ended before the
next label is appended and skipped with a warning when read, wherever it is. Output files are
rewritten whole from the journal and replaced atomically, so a crash leaves the old file or the new
one, never half of one.
"""
import json
import os
import re
import sys
import time

from .errors import UserError
from .metrics import cohen_kappa

SCORE_LABELS = {"good": 1, "bad": 0, "skip": None}
PAIR_LABELS = ("a", "b", "tie", "skip")
ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_annotator(name):
    if not isinstance(name, str) or not ANNOTATOR_NAME.match(name) or name in (".", ".."):
        raise UserError(f"annotator {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return name


def write_json_atomic(path, obj):
    """Write JSON to path.tmp, flush it to disk, then rename over path: the file is whole or old."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def journal_path(output_dir, annotator):
    return os.path.join(output_dir, annotator, "journal.jsonl")


def append_label(path, item, label, annotator, when=None):
    """Append one label to the journal and force it to disk before returning (the label is saved
    the moment it is given). Returns the record."""
    record = {"item": item, "label": label, "annotator": annotator,
              "time": when or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = (json.dumps(record) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line torn by a crash: end it, or this label would be glued onto it
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return record


def read_journal(path):
    """{item: last record} from a journal. A line that is not a whole label record (cut short by a
    crash or a full disk mid-write: its label was never confirmed to the annotator) is skipped, with a
    warning naming it, wherever it is."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    latest, bad = {}, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = label_record(line)
        if record is None:
            bad.append(n)
        else:
            latest[record["item"]] = record
    if bad:
        print(f"warning: {path}: line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
              f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''} not a whole label record (cut short by a crash?); "
              "skipped", file=sys.stderr)
    return latest


def label_record(line):
    """The record of one journal line, or None when the line is not a whole one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("item", "label", "annotator", "time")):
        return None
    return record


def read_all_journals(output_dir):
    """{annotator: {item: record}} for every annotator folder with a journal under output_dir."""
    found = {}
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            path = journal_path(output_dir, name)
            if ANNOTATOR_NAME.match(name) and os.path.isfile(path):
                found[name] = read_journal(path)
    return found


def result_key(result_path, meta_dir):
    """How a score-mode item is named in journals: its result's path relative to the meta.json's folder
    (stays valid when the whole folder moves)."""
    return os.path.relpath(os.path.abspath(result_path), os.path.abspath(meta_dir))


def consensus(journals, keys):
    """{key: 1 good / 0 bad} for items the annotators' good/bad labels settle by majority (skips do not
    count; a tie settles nothing), and {key: number of good/bad labels} for every key."""
    votes = {k: [SCORE_LABELS[labels[k]["label"]] for labels in journals.values()
                 if k in labels and SCORE_LABELS.get(labels[k]["label"]) is not None] for k in keys}
    settled = {k: int(sum(v) * 2 > len(v)) for k, v in votes.items() if v and sum(v) * 2 != len(v)}
    return settled, {k: len(v) for k, v in votes.items()}


def gt_label(error, border_fill_error, good_fraction=0.5, good_floor=0.02):
    """A simulated annotator's verdict from the known answer: good (1) when the result's masked error
    against GT is below `good_fraction` of the border fill's on the same input (not clearly better than
    the trivial fill is not a good removal), or below `good_floor` ([-1, 1] pixel units: where the fill
    is nearly perfect)."""
    return int(error < max(good_fraction * border_fill_error, good_floor))


def scored_entries(items, labels):
    """The scored meta.json entries of the labelled items (skips left out): each item's own keys
    (absolute image paths, anything it carried, such as discriminator_score), score 0/1, annotator
    and time. items: [(key, entry dict with absolute paths)] in order."""
    out = []
    for key, entry in items:
        record = labels.get(key)
        if record is None or SCORE_LABELS.get(record["label"]) is None:
            continue
        out.append({**entry, "score": SCORE_LABELS[record["label"]], "annotator": record["annotator"],
                    "annotated_at": record["time"]})
    return out


def labelled_pairs(doc, labels):
    """A copy of an --export_pairs pairs.json with each pair's label ("a", "b", "tie"; null when
    skipped or not yet given), plus who gave it and when: what --pair_labels reads."""
    pairs = []
    for pair in doc["pairs"]:
        record = labels.get(pair_key(pair))
        label = record["label"] if record else None
        pairs.append({**pair, "label": None if label == "skip" else label,
                      **({"annotator": record["annotator"], "annotated_at": record["time"]} if record else {})})
    return {**doc, "pairs": pairs}


def pair_key(pair):
    return pair["image"]


def discriminator_label(item, mode, threshold=0.5):
    """What the discriminator (or the reward recorded at export) says of an item, in the annotators'
    labels: "good"/"bad" from an entry's discriminator_score; "a"/"b"/"tie" from a pair's rewards.
    None when the item carries no such score."""
    if mode == "score":
        s = item.get("discriminator_score")
        return None if not isinstance(s, (int, float)) else ("good" if s >= threshold else "bad")
    a, b = item.get("reward_a"), item.get("reward_b")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return "a" if a > b else "b" if b > a else "tie"


def agreement(journals, items, mode, threshold=0.5):
    """Who labelled how much, Cohen's kappa for every two annotators on the items both labelled
    (skips left out), and each annotator's agreement with the discriminator (fraction and kappa).
    journals: {annotator: {item: record}}; items: {item key: item dict}."""
    def given(labels):
        return {k: r["label"] for k, r in labels.items() if r["label"] != "skip" and k in items}

    names = sorted(journals)
    per = {n: given(journals[n]) for n in names}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(per[a]) & set(per[b]))
            la, lb = [per[a][k] for k in common], [per[b][k] for k in common]
            pairs.append({"a": a, "b": b, "items": len(common), "kappa": cohen_kappa(la, lb),
                          "agreement": sum(x == y for x, y in zip(la, lb)) / len(common) if common else None})
    machine = {}
    for n in names:
        both = [(lab, d) for k, lab in per[n].items() if (d := discriminator_label(items[k], mode, threshold)) is not None]
        machine[n] = {"items": len(both), "agreement": sum(x == y for x, y in both) / len(both) if both else None,
                      "kappa": cohen_kappa([x for x, _ in both], [y for _, y in both])}
    return {"labelled": {n: len(per[n]) for n in names}, "annotators": pairs, "discriminator": machine}


def agreement_lines(report):
    """The agreement report as lines a person reads."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"{n}: {k} labels" for n, k in report["labelled"].items()] or ["no labels yet"]
    lines += [f"{p['a']} vs {p['b']}: {p['items']} items both labelled, agreement {num(p['agreement'], '.1%')}, "
              f"Cohen's kappa {num(p['kappa'], '.3f')}" for p in report["annotators"]]
    lines += [f"{n} vs the discriminator: {m['items']} items, agreement {num(m['agreement'], '.1%')}, "
              f"kappa {num(m['kappa'], '.3f')}" for n, m in report["discriminator"].items() if m["items"]]
    return lines
