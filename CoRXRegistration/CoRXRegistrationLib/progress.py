"""Progress reporting: every long step takes ``progress(fraction, text)``; this is the terminal one."""
from __future__ import annotations

import sys
import time


class Cancelled(RuntimeError):
    """The user cancelled a long operation (raised between its steps, where ``cancel()`` said so)."""


def check_cancel(cancel, where: str) -> None:
    """Raise :class:`Cancelled` when the optional ``cancel() -> bool`` callback asks for it."""
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled {where}")


class TerminalProgress:
    """A one-line progress bar on stderr: ``label [#####.....]  50%  text  (12.3 s)``."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()

    def __call__(self, fraction: float, text: str = "") -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        bar = "#" * int(round(f * self.width))
        line = f"\r{self.label} [{bar:<{self.width}}] {f * 100:3.0f}%  {text:<28.28} ({time.perf_counter() - self.start:5.1f} s)"
        self.stream.write(line + ("\n" if f >= 1.0 else ""))
        self.stream.flush()
