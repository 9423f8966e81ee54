"""User mistakes end a script with a one-line message and a non-zero exit, never a traceback."""
import json
import os
import sys


class UserError(Exception):
    """Bad input from the user (a path, a meta.json entry, an argument). The message says which and why."""


def run_cli(main):
    """Call main(); a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        for line in user_message(e).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def user_message(e):
    """A UserError's message; one raised in a DataLoader worker comes back re-raised by torch with the
    worker's traceback in its text, from which the message is taken."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.rstrip().rsplit("UserError: ", 1)[-1]
    return text


def output_folder(path, flag):
    """Create an output folder (and its parents), or say in one line why it cannot be: a file in
    the way, no permission, a read-only filesystem."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror or e.__class__.__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in it")
    return path


def output_file(path, flag):
    """Say in one line, before any work, why a file cannot be written at `path`: a folder there, a file
    where a folder of its path should be, no permission."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: a folder; give a file name")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing}")
    return path


def read_json_object(path, what, hint=""):
    """A JSON file holding one object, or one line saying `path: what (why)hint` (cut short, not JSON,
    a list where an object belongs)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise ValueError(f"a {type(obj).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: {what} ({e.__class__.__name__}: {str(e)[:120]}){hint}") from None
    return obj
