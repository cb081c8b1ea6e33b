"""Declared value ranges, checked the same way wherever a value comes from: a command-line flag (cli.py
wraps these as argparse types), a JSON settings file, or a saved config.json (`loading.validate_config`)."""

from __future__ import annotations

import math


class RangeError(ValueError):
    """A value outside its declared range, or not a number of the declared kind."""


class Bounded:
    """A check: a finite int or float in [low, high] (`low_open` / `high_open` exclude the end); calling it
    returns the value converted to `kind` or raises RangeError."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = kind.__name__  # argparse names the type in its own messages

        def fmt(v: float) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        if low is not None and high is not None:
            self.rule = f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
        elif low is not None:
            self.rule = f"{'>' if low_open else '>='} {fmt(low)}"
        elif high is not None:
            self.rule = f"{'<' if high_open else '<='} {fmt(high)}"
        else:
            self.rule = "finite"
        self.range_text = f"must be {self.rule}"

    def __call__(self, value: str | int | float) -> int | float:
        if isinstance(value, bool):  # JSON true/false are not numbers
            raise RangeError(f"expected {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        try:
            x = self.kind(value) if isinstance(value, str) else value
        except ValueError:
            raise RangeError(f"'{value}' is not {'an integer' if self.kind is int else 'a number'}") from None
        if not isinstance(x, int | float) or (self.kind is int and not float(x).is_integer()):
            raise RangeError(f"expected {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        x = self.kind(x)
        if not math.isfinite(x):
            raise RangeError(f"must be a finite number, got {value}")
        too_low = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        too_high = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if too_low or too_high:
            raise RangeError(f"must be {self.rule}, got {value}")
        return x


MULTIPLIER = Bounded(float, 0, 1, low_open=True)  # a width or depth ratio
LAYER = Bounded(int, 0)
COUNT = Bounded(int, 1)  # sizes, batches, examples, threads
STEPS = Bounded(int, 0)  # step counts where 0 means "none" / "off"
NON_NEGATIVE = Bounded(float, 0)  # loss weights, weight decay, thresholds
POSITIVE = Bounded(float, 0, low_open=True)
PROBABILITY = Bounded(float, 0, 1, high_open=True)  # dropout
SEED = Bounded(int, 0, 2**32 - 1)  # numpy's seed range
