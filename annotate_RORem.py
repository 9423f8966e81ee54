#!/usr/bin/env python
"""Label removal results in a browser: a local web app for annotators (RORem's stage 2).

    # score mode: source | mask | result, keys g (good), b (bad), s (skip)
    python annotate_RORem.py --meta_path results/meta.json --annotator alice
    # pairwise mode: the pairs train_RORem_ddpo.py --export_pairs wrote, keys a, b, t (tie), s (skip)
    python annotate_RORem.py --pairs_path export/pairs.json --annotator alice
    # the agreement report alone (no server)
    python annotate_RORem.py --meta_path results/meta.json --report

Open http://127.0.0.1:7860 (the app binds to 127.0.0.1 unless --host says otherwise). Several
people can label the same set, at once or in turn: each is named in the page (?annotator=bob) and
gets a journal; the page and --report show their agreement (Cohen's kappa) and each one's agreement
with the discriminator (an entry's discriminator_score, as inference_RORem_discriminator.py writes
it; for pairs, the rewards recorded at export).

Every label is appended to <output_dir>/<annotator>/journal.jsonl and forced to disk before the page
moves on; a restart resumes at the first item that annotator has not labelled. After each label the
outputs are rewritten atomically:
  score mode: <output_dir>/<annotator>/meta.json, a scored meta.json (score 0/1, annotator,
              annotated_at; image paths absolute) that train_RORem_discriminator.py,
              scripts/build_preference_pairs.py and the other scored-data readers take as it is;
  pairwise:   <export folder>/pairs-<annotator>.json, for train_RORem_ddpo.py --pair_labels.
The server only ever sends the image files of the data it was started on.
"""
import argparse
import json
import os
import threading

from myutils import annotation as ann
from myutils.data import read_meta, scan_entries
from myutils.errors import UserError, run_cli

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "annotate.html")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--meta_path", help="score mode: a results meta.json of {source, mask, GT=result} entries (or its folder)")
    data.add_argument("--pairs_path", help="pairwise mode: the pairs.json of an --export_pairs folder (or the folder)")
    p.add_argument("--annotator", default="annotator", help="the name labels are saved under (the page can change it)")
    p.add_argument("--output_dir", default=None,
                   help="journals and scored meta.json files (default: an annotations folder beside the data)")
    p.add_argument("--discriminator_threshold", type=float, default=0.5, help="discriminator_score >= this counts as good")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--report", action="store_true", help="print the agreement report and exit")
    args = p.parse_args(argv)
    ann.check_annotator(args.annotator)
    return args


def json_in(path, name):
    """A folder is taken to mean the file `name` in it."""
    if os.path.isdir(path):
        inside = os.path.join(path, name)
        if not os.path.isfile(inside):
            raise UserError(f"{path}: a folder without {name}")
        return inside
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    return path


class Labels:
    """The data being labelled, and the labels given so far (journals), with one lock for writes."""

    def __init__(self, args):
        self.threshold = args.discriminator_threshold
        self.lock = threading.RLock()  # labels arrive on the server's worker threads; reads take it too
        if args.meta_path:
            self.mode, path = "score", json_in(args.meta_path, "meta.json")
            root = os.path.dirname(os.path.abspath(path))
            entries = read_meta(path, "triplet")
            dropped = ("score", "annotator", "annotated_at")  # replaced by this annotation
            self.keys = [ann.result_key(e.paths["GT"], root) for e in entries]
            self.items = {k: {**{x: v for x, v in e.extra.items() if x not in dropped}, **e.paths}
                          for k, e in zip(self.keys, entries)}
            self.images = {k: [("source", e.paths["source"]), ("mask", e.paths["mask"]), ("result", e.paths["GT"])]
                           for k, e in zip(self.keys, entries)}
            self.problems = {k: p for k, (p, _) in zip(self.keys, scan_entries(entries)) if p}
        else:
            self.mode, path = "pairs", json_in(args.pairs_path, "pairs.json")
            root = os.path.dirname(os.path.abspath(path))
            try:
                with open(path, encoding="utf-8") as f:
                    self.doc = json.load(f)
                pairs = self.doc["pairs"]
                self.keys = [ann.pair_key(q) for q in pairs]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}: not a pairs.json written by --export_pairs ({e.__class__.__name__}: {e})") from None
            self.items = dict(zip(self.keys, pairs))
            self.images = {k: [("source | mask | a | b", os.path.join(root, k))] for k in self.keys}
            self.problems = {k: f"{k}: image file not found in {root}" for k in self.keys if not os.path.isfile(os.path.join(root, k))}
        self.data_path, self.root = path, root
        self.output_dir = args.output_dir or os.path.join(root, "annotations")
        self.allowed = tuple(ann.SCORE_LABELS) if self.mode == "score" else ann.PAIR_LABELS
        self.journals = ann.read_all_journals(self.output_dir)

    def output_path(self, annotator):
        if self.mode == "score":
            return os.path.join(self.output_dir, annotator, "meta.json")
        return os.path.join(self.root, f"pairs-{annotator}.json")

    def give(self, annotator, index, label):
        """Record one label: journal first (on disk before this returns), then the output file."""
        ann.check_annotator(annotator)
        if not isinstance(index, int) or not 0 <= index < len(self.keys):
            raise UserError(f"item {index!r}: there are {len(self.keys)} items (0-{len(self.keys) - 1})")
        if label not in self.allowed:
            raise UserError(f"label {label!r}: one of {', '.join(self.allowed)} in {self.mode} mode")
        key = self.keys[index]
        with self.lock:
            record = ann.append_label(ann.journal_path(self.output_dir, annotator), key, label, annotator)
            labels = self.journals.setdefault(annotator, {})
            labels[key] = record
            if self.mode == "score":
                out = ann.scored_entries([(k, self.items[k]) for k in self.keys], labels)
            else:
                out = ann.labelled_pairs(self.doc, labels)
            ann.write_json_atomic(self.output_path(annotator), out)
        return record

    def next_index(self, annotator, after=-1):
        """The first item after `after` (wrapping round) this annotator has not labelled; None if none."""
        done = self.journals.get(annotator, {})
        n = len(self.keys)
        for step in range(1, n + 1):
            i = (after + step) % n
            if self.keys[i] not in done:
                return i
        return None

    def item(self, annotator, index):
        key = self.keys[index]
        record = self.journals.get(annotator, {}).get(key)
        return {"index": index, "key": key, "label": record["label"] if record else None,
                "images": [{"name": name, "url": f"/file/{index}/{j}"} for j, (name, _) in enumerate(self.images[key])],
                "problem": self.problems.get(key)}

    def report(self):
        with self.lock:
            return ann.agreement(self.journals, self.items, self.mode, self.threshold)


def build_app(labels, default_annotator):
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    app = FastAPI(title="RORem annotation")

    @app.exception_handler(UserError)
    def user_error(_request, e):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read().replace("__DEFAULT_ANNOTATOR__", json.dumps(default_annotator))

    @app.get("/api/state")
    def state(annotator: str, index: int = None, after: int = -1):
        ann.check_annotator(annotator)
        n = len(labels.keys)
        if index is not None and not 0 <= index < n:
            raise UserError(f"item {index}: there are {n} items")
        with labels.lock:  # one consistent view while other annotators' labels arrive
            nxt = labels.next_index(annotator, after) if index is None else index
            done = sum(k in labels.journals.get(annotator, {}) for k in labels.keys)
            return {"mode": labels.mode, "data": labels.data_path, "annotator": annotator, "total": n, "done": done,
                    "labels": list(labels.allowed), "output": labels.output_path(annotator),
                    "item": None if nxt is None else labels.item(annotator, nxt),
                    "agreement": ann.agreement_lines(labels.report())}

    @app.post("/api/label")
    def label(annotator: str = Body(...), index: int = Body(...), label: str = Body(...)):
        record = labels.give(annotator, index, label)
        with labels.lock:
            return {"saved": record, "next": labels.next_index(annotator, index)}

    @app.get("/api/agreement")
    def agreement():
        return labels.report()

    @app.get("/file/{index}/{which}")
    def file(index: int, which: int):
        # only the files of the data this server was started on, by position: no path comes from the client
        if not 0 <= index < len(labels.keys) or not 0 <= which < len(labels.images[labels.keys[index]]):
            raise HTTPException(404, "no such item")
        path = labels.images[labels.keys[index]][which][1]
        if not os.path.isfile(path):
            raise HTTPException(404, f"file not found: {path}")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    return app


def main(argv=None):
    args = parse_args(argv)
    labels = Labels(args)
    if args.report:
        print(f"{labels.data_path}: {len(labels.keys)} items, {labels.mode} mode, labels in {labels.output_dir}")
        print("\n".join(ann.agreement_lines(labels.report())))
        return labels.report()
    if labels.problems:
        print(f"{len(labels.problems)} of {len(labels.keys)} items cannot be shown (the page says why and offers skip); first: "
              f"{next(iter(labels.problems.values()))}")
    import uvicorn

    print(f"annotating {len(labels.keys)} items ({labels.mode} mode) at http://{args.host}:{args.port} ; labels in {labels.output_dir}")
    uvicorn.run(build_app(labels, args.annotator), host=args.host, port=args.port, log_level="warning")
    return labels


if __name__ == "__main__":
    run_cli(main)
