"""argparse types that check a number where it is read (command line and --config files alike), so a
bad value stops the run with the argument's own name before any work: `--resolution 0` no longer runs
at 8 px, `--max_train_steps 0` no longer trains an epoch, NaN never passes."""
import argparse
import math


def _number(kind, text):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind, name, minimum=None, maximum=None, above=None, below=None):
    def parse(text):
        value = _number(kind, text)
        for bound, holds, words in ((minimum, lambda b: value >= b, "at least"), (maximum, lambda b: value <= b, "at most"),
                                    (above, lambda b: value > b, "above"), (below, lambda b: value < b, "below")):
            if bound is not None and not holds(bound):
                raise argparse.ArgumentTypeError(f"must be {words} {bound if kind is int else format(bound, 'g')}, "
                                                 f"got {value if kind is int else format(value, 'g')}")
        return value
    parse.__name__ = name  # argparse names the type in its own messages
    return parse


def integer(minimum=None, maximum=None):
    """An int in [minimum, maximum] (either bound optional)."""
    return _bounded(int, "integer", minimum, maximum)


def real(minimum=None, maximum=None, above=None, below=None):
    """A finite float in [minimum, maximum], or strictly above / below a bound."""
    return _bounded(float, "number", minimum, maximum, above, below)


def resolution(text):
    """A processing size in pixels: a multiple of 8 (the VAE's factor; the latents would not tile), at least 8."""
    value = integer(8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {value}")
    return value


POSITIVE = integer(1)        # sizes, counts, steps
NONNEGATIVE = integer(0)     # "0 = off" intervals, offsets
SEED = integer(0, 2 ** 32 - 1)  # what every library's generator takes (numpy's legacy one the least)
FRACTION = real(0, 1)        # decays, shares
SCORE = real()               # thresholds on discriminator scores (RORem's softplus head is not bounded by 1)
POSITIVE_REAL = real(above=0)
NONNEGATIVE_REAL = real(minimum=0)
ANY_REAL = real()
