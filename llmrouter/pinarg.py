"""Pins on command lines: a pin is 43 base64url characters, and one in 64 begins with "-".

argparse takes ``--pin -KEY`` for two options ("expected one argument") unless it is written
``--pin=-KEY``. Operators paste pins the way the docs write them (``--pin "$PIN"``), so every
command that takes a pin attaches such a value to its option before argparse sees it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_DASH_PIN = re.compile(r"-[A-Za-z0-9_-]{42}")


def pins_attached(argv: Sequence[str], options: Iterable[str]) -> list[str]:
    """``OPTION -KEY`` as ``OPTION=-KEY`` for each of ``options`` that takes a pin."""
    takes_pin = frozenset(options)
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in takes_pin and _DASH_PIN.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out
