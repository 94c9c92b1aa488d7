"""The argument types of the `raymeta` command line: comma-separated lists and bounded numbers, each
refusing bad text with argparse's one-line error."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["float_parser", "int_list", "non_negative_float", "positive", "positive_float", "positive_list", "str_list"]


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def str_list(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def float_parser(allow_zero: bool) -> Callable[[str], float]:
    """A finite number > 0 (or >= 0 with `allow_zero`), for argparse."""
    expected = "a number >= 0" if allow_zero else "a positive number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (0 <= value if allow_zero else 0 < value) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_float = float_parser(allow_zero=False)
non_negative_float = float_parser(allow_zero=True)


def positive_list(text: str) -> tuple[int, ...]:
    values = int_list(text)
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {bad[0]}")
    return values


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- parser --------------------------------------------------------------------------------------
