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


def integer(minimum=None, maximum=None):
    """An int in [minimum, maximum] (either bound optional)."""
    def parse(text):
        value = _number(int, text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def real(minimum=None, maximum=None, above=None, below=None):
    """A finite float in [minimum, maximum], or strictly above / below a bound."""
    def parse(text):
        value = _number(float, text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}, got {value:g}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be below {below:g}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE = integer(1)        # sizes, counts, steps
NONNEGATIVE = integer(0)     # "0 = off" intervals, offsets
SEED = integer(0)
FRACTION = real(0, 1)        # probabilities, thresholds on [0, 1] scores, shares
POSITIVE_REAL = real(above=0)
NONNEGATIVE_REAL = real(minimum=0)
ANY_REAL = real()
