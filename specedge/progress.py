"""Progress bars that suit where they land: tqdm on a terminal; anywhere else (a log file, a
pipe, the journal) a plain line at most every few seconds, so `make demo > log 2>&1` does not
fill with carriage-return frames."""
from __future__ import annotations

import sys
import time


def bar(total: int | None, desc: str, unit: str = "it", *, initial: int = 0, leave: bool = True,
        disable: bool = False, file=None, interval_s: float = 5.0, clock=time.monotonic):
    """A progress bar over `total` units ("B" counts bytes, shown in MB); tqdm's update,
    set_postfix_str and close, usable as a context manager."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", initial=initial, leave=leave,
                    disable=disable, file=stream)
    return LineProgress(total, desc, unit, initial, leave, disable, stream, interval_s, clock)


class LineProgress:
    """One plain line at most every `interval_s`, and a last one on close (when `leave`)."""

    def __init__(self, total, desc, unit, initial, leave, disable, stream, interval_s, clock):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.leave, self.disable, self.stream = leave, disable, stream
        self.interval_s, self.clock = interval_s, clock
        self.postfix = ""
        self._last_line = clock()  # a task shorter than the interval shows only its last line
        self._shown: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self._last_line >= self.interval_s:
            self._write()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self._closed and self.leave and not self.disable and self._shown != self.n:
            self._write()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def text(self) -> str:
        if self.unit == "B":
            done, total, unit = f"{self.n / 1e6:.0f}", self.total and f"{self.total / 1e6:.0f}", " MB"
        else:
            done, total, unit = str(self.n), self.total and str(self.total), f" {self.unit}"
        line = f"{self.desc}: {done}/{total}{unit}" if total else f"{self.desc}: {done}{unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        return f"{line}, {self.postfix}" if self.postfix else line

    def _write(self) -> None:
        print(self.text(), file=self.stream, flush=True)
        self._last_line, self._shown = self.clock(), self.n


def say(line: str) -> None:
    """One line on stderr, flushed: what commands report while they load, build and serve."""
    print(line, file=sys.stderr, flush=True)
