"""User mistakes end a script with a one-line message and a non-zero exit, never a traceback."""
import sys


class UserError(Exception):
    """Bad input from the user (a path, a meta.json entry, an argument). The message says which and why."""


def run_cli(main):
    """Call main(); a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        for line in str(e).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
