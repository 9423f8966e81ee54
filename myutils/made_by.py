"""Reusing finished work only when the same inputs and settings made it. A rerun into a folder that
holds results (batch inference, evaluation's generated images, preference candidates) compares each
result's key, recorded when it was written, with the key this run would give it; a result made
from other inputs (paths, sizes, mtimes) or other settings is never passed off as this run's."""
import hashlib
import json
import os

from .data import entry_digests
from .errors import UserError

FILE = "made_by.json"


def keys(entries, args, ignore=()):
    """Per entry: a digest of its input files and of every argument not in `ignore` (where results
    go, how they are batched: what does not change a result). An argument naming a file or folder
    (weights) counts with its files' sizes and mtimes: a model retrained at the same path is another."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ignore}
    settings.update({f"{k} files": files_stamp(v) for k, v in list(settings.items()) if isinstance(v, str) and v and os.path.exists(v)})
    text = json.dumps(settings, default=str)
    return [hashlib.sha256(f"{d}\n{text}".encode()).hexdigest()[:32] for d in entry_digests(entries)]


def files_stamp(path):
    """Names, sizes and mtimes of a file, or of every file under a folder."""
    found = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [(os.path.relpath(f, path) if f != path else "", os.path.getsize(f), os.stat(f).st_mtime_ns) for f in found]


def read(folder):
    """{result name: key} recorded in `folder` (empty when none)."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable; delete it together with the results it describes") from None


def write(folder, made):
    """Record {result name: key} atomically (after each batch, so a killed run leaves a true record)."""
    tmp = os.path.join(folder, FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(made, f, indent=0)
    os.replace(tmp, os.path.join(folder, FILE))


def stale(folder, names, wanted):
    """Names of results in `folder` that exist but were not made with the wanted keys."""
    made = read(folder)
    return [n for n, k in zip(names, wanted) if os.path.exists(os.path.join(folder, n)) and made.get(n) != k]
