"""User mistakes end a script with a one-line message and a non-zero exit, never a traceback."""
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
