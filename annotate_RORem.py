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
moves on: the journal is the record (a line torn by a crash is skipped with a warning; no label
confirmed to the page is lost). A restart resumes at the first item that annotator has not labelled.
The output files are written from the journals, whole and atomically, when the server starts, when a
person presses w (or the page's button), when an annotator has labelled every item, and when the
server stops (Ctrl-C, SIGTERM); --export writes them without a server:
  score mode: <output_dir>/<annotator>/meta.json, a scored meta.json (score 0/1, annotator,
              annotated_at; image paths absolute) that train_RORem_discriminator.py,
              scripts/build_preference_pairs.py and the other scored-data readers take as it is;
  pairs mode: <export folder>/pairs-<annotator>.json, for train_RORem_ddpo.py --pair_labels.
The server sends only files its data names that are images (checked at start and again when sent),
whose real location (symlinks resolved) is under the data's folders: the data file's folder, the
folders its entries name images in, and any --data_root. It answers only the host names it was started for.
"""
import argparse
import gc
import io
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

from myutils import annotation as ann
from myutils.args import SCORE
from myutils.data import read_meta, scan_entries
from myutils.errors import UserError, output_folder, run_cli
from myutils.web import add_server_args, allowed_hosts, check_port, guard_hosts, serve

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "annotate.html")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--meta_path", help="score mode: a results meta.json of {source, mask, GT=result} entries (or its folder)")
    data.add_argument("--pairs_path", help="pairs mode: the pairs.json of an --export_pairs folder (or the folder)")
    p.add_argument("--annotator", default="annotator", help="the name labels are saved under (the page can change it)")
    p.add_argument("--output_dir", default=None,
                   help="journals and scored meta.json files (default: an annotations folder beside the data)")
    p.add_argument("--data_root", action="append", default=[],
                   help="a folder images may also be served from (their real location); repeatable")
    p.add_argument("--discriminator_threshold", type=SCORE, default=0.5, help="discriminator_score >= this counts as good")
    add_server_args(p)
    p.add_argument("--report", action="store_true", help="print the agreement report and exit")
    p.add_argument("--export", action="store_true", help="write every annotator's output file from the journals and exit")
    args = p.parse_args(argv)
    ann.check_annotator(args.annotator)
    for root in args.data_root:
        if not os.path.isdir(root):
            raise UserError(f"--data_root {root}: not a folder")
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


def image_bytes(data):
    """The image format of `data`, or None when it is not an image Pillow reads."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
        return fmt
    except Exception:  # noqa: BLE001 (anything Pillow cannot take is not an image)
        return None


def under(path, roots):
    """Whether `path` (resolved) lies in one of the folders `roots` (a set of resolved paths)."""
    parent = os.path.dirname(path)
    while True:
        if parent in roots:
            return True
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up


def first_twice(keys, what):
    """Refuse data that names one item twice: labels are kept per item, so both would take one label."""
    seen = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise UserError(f"{what} {seen[k]} and {i} have the same {k!r}; each needs its own, or one of them "
                            "would be marked done by the other's label")
        seen[k] = i


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
            first_twice(self.keys, f"{path}: entries")
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
                if not all(isinstance(k, str) and k for k in self.keys):
                    raise TypeError("a pair's 'image' is not a file name")
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}: not a pairs.json written by --export_pairs ({e.__class__.__name__}: {e})") from None
            first_twice(self.keys, f"{path}: pairs")
            self.items = dict(zip(self.keys, pairs))
            self.images = {k: [("source | mask | a | b", os.path.normpath(os.path.join(root, k)))] for k in self.keys}
            with ThreadPoolExecutor(8) as pool:
                found = pool.map(lambda k: self.image_problem(self.images[k][0][1]), self.keys)
                self.problems = {k: f"{self.images[k][0][1]}: {p}" for k, p in zip(self.keys, found) if p}
        self.data_path, self.root = path, root
        # the data's folders: where its file is, the folders it names images in, --data_root; real locations stay in them
        named = {os.path.dirname(p) for k in self.keys if k not in self.problems for _, p in self.images[k]}
        self.roots = {os.path.realpath(d) for d in [root, *named, *args.data_root]}
        for k in self.keys:
            if k not in self.problems:
                outside = [p for _, p in self.images[k] if not under(os.path.realpath(p), self.roots)]
                if outside:
                    self.problems[k] = (f"{outside[0]} is a link to {os.path.realpath(outside[0])}, outside the data's folders "
                                        "(--data_root adds a folder)")
        self.output_dir = output_folder(args.output_dir or os.path.join(root, "annotations"), "--output_dir")
        if self.mode == "pairs" and not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f"{root}: cannot write the pairs-<annotator>.json files in it")
        self.allowed = tuple(ann.SCORE_LABELS) if self.mode == "score" else ann.PAIR_LABELS
        self.key_set = set(self.keys)
        self.journals = ann.read_all_journals(self.output_dir)
        self.done = {a: sum(k in self.key_set for k in labels) for a, labels in self.journals.items()}

    @staticmethod
    def image_problem(path):
        try:
            with open(path, "rb") as f:
                return None if image_bytes(f.read()) else "not an image"
        except OSError as e:
            return f"cannot be read ({e.strerror or e.__class__.__name__})"

    def output_path(self, annotator):
        if self.mode == "score":
            return os.path.join(self.output_dir, annotator, "meta.json")
        return os.path.join(self.root, f"pairs-{annotator}.json")

    def give(self, annotator, index, label):
        """Record one label: in the journal, on disk, before this returns. The cost of a label does not
        grow with the data: output files are written on demand (write)."""
        ann.check_annotator(annotator)
        if not isinstance(index, int) or not 0 <= index < len(self.keys):
            raise UserError(f"item {index!r}: there are {len(self.keys)} items (0-{len(self.keys) - 1})")
        if label not in self.allowed:
            raise UserError(f"label {label!r}: one of {', '.join(self.allowed)} in {self.mode} mode")
        key = self.keys[index]
        with self.lock:
            try:
                record = ann.append_label(ann.journal_path(self.output_dir, annotator), key, label, annotator)
            except OSError as e:
                raise UserError(f"not saved: {ann.journal_path(self.output_dir, annotator)}: {e.strerror or e}") from None
            labels = self.journals.setdefault(annotator, {})
            self.done[annotator] = self.done.get(annotator, 0) + (key not in labels)
            labels[key] = record
            if self.done[annotator] == len(self.keys) and key not in self.problems:
                self.write(annotator)  # the last item: the files are complete now
        return record

    def write(self, annotator=None):
        """Write one annotator's output file (all annotators' without a name) from the journals; the paths."""
        with self.lock:
            names = [annotator] if annotator else sorted(self.journals)
            written = []
            for name in names:
                labels = self.journals.get(name, {})
                if self.mode == "score":
                    out = ann.scored_entries([(k, self.items[k]) for k in self.keys], labels)
                else:
                    out = ann.labelled_pairs(self.doc, labels)
                path = self.output_path(name)
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    ann.write_json_atomic(path, out)
                except OSError as e:
                    raise UserError(f"{path}: cannot be written ({e.strerror or e}); the labels are safe in the journal") from None
                written.append(path)
            return written

    def next_index(self, annotator, after=-1):
        """The first item after `after` (wrapping round) this annotator has not labelled; None if none."""
        done = self.journals.get(annotator, {})
        n = len(self.keys)
        if self.done.get(annotator, 0) >= n:
            return None
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

    def image(self, index, which):
        """(bytes, format) of an image the data names, or None: only a file the start-up check passed, still
        an image now, whose real location is in the data's folders (a file swapped since is not sent)."""
        if not 0 <= index < len(self.keys) or self.keys[index] in self.problems:
            return None
        names = self.images[self.keys[index]]
        if not 0 <= which < len(names):
            return None
        try:
            fd = os.open(names[which][1], os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            real = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else os.path.realpath(names[which][1])
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not under(real, self.roots):
                return None
            data = f.read()
        fmt = image_bytes(data)
        return (data, fmt) if fmt else None

    def report(self):
        with self.lock:  # a snapshot: labels keep arriving while the report is computed
            journals = {a: dict(labels) for a, labels in self.journals.items()}
        return ann.agreement(journals, self.items, self.mode, self.threshold)


def build_app(labels, default_annotator, hosts=None):
    """The page and its API; answering only `hosts` (default: this machine's loopback names)."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, Response

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
            return {"mode": labels.mode, "data": labels.data_path, "annotator": annotator, "total": n,
                    "done": labels.done.get(annotator, 0), "labels": list(labels.allowed), "output": labels.output_path(annotator),
                    "item": None if nxt is None else labels.item(annotator, nxt)}

    @app.post("/api/label")
    def label(annotator: str = Body(...), index: int = Body(...), label: str = Body(...)):
        record = labels.give(annotator, index, label)
        with labels.lock:
            return {"saved": record, "next": labels.next_index(annotator, index), "done": labels.done[annotator]}

    @app.post("/api/write")
    def write(annotator: str = Body(..., embed=True)):
        ann.check_annotator(annotator)
        return {"written": labels.write(annotator)}

    @app.get("/api/agreement")
    def agreement():
        report = labels.report()
        return {**report, "lines": ann.agreement_lines(report)}

    @app.get("/file/{index}/{which}")
    def file(index: int, which: int):
        # by position only: no path comes from the client, and only the data's own images go out
        found = labels.image(index, which)
        if found is None:
            raise HTTPException(404, "no such image")
        data, fmt = found
        return Response(data, media_type=f"image/{fmt.lower()}", headers={"Cache-Control": "no-store"})

    return guard_hosts(app, hosts or allowed_hosts("127.0.0.1"))


def main(argv=None):
    args = parse_args(argv)
    if not (args.report or args.export):
        check_port(args.host, args.port)
    labels = Labels(args)
    if args.report:
        print(f"{labels.data_path}: {len(labels.keys)} items, {labels.mode} mode, labels in {labels.output_dir}")
        print("\n".join(ann.agreement_lines(labels.report())))
        return labels.report()
    written = labels.write()  # catches up with labels given since the files were last written (a crash)
    gc.freeze()  # the data's objects live as long as the server: the collector need not walk them again per label
    if args.export:
        print("\n".join(f"wrote {p}" for p in written) or f"no journals in {labels.output_dir}")
        return labels
    if labels.problems:
        print(f"{len(labels.problems)} of {len(labels.keys)} items cannot be shown (the page says why and offers skip); first: "
              f"{next(iter(labels.problems.values()))}")
    roots = sorted(labels.roots)
    print(f"images served from {len(roots)} folder(s): {', '.join(roots[:3])}{' ...' if len(roots) > 3 else ''}")
    print(f"annotating {len(labels.keys)} items ({labels.mode} mode) at http://{args.host}:{args.port} ; labels in {labels.output_dir}")
    try:
        serve(build_app(labels, args.annotator, allowed_hosts(args.host, args.allowed_host)), args)
    finally:
        for path in labels.write():
            print(f"wrote {path}")
    return labels


if __name__ == "__main__":
    run_cli(main)
