"""Progress bars: tqdm on a terminal, plain rate-limited lines anywhere else."""
from __future__ import annotations

import io
import os

from specedge.progress import LineProgress, bar


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_is_plain_lines_at_most_every_interval():
    out, clock = io.StringIO(), _Clock()
    with bar(1117 * 10**6, "fetch model.gguf", "B", file=out, interval_s=5.0, clock=clock) as progress:
        for _ in range(1117):  # 1 MB every 40 ms: 44.7 s in all
            clock.now += 0.04
            progress.update(10**6)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 44.7 // 5 + 1  # one per 5 s, and the last one
    assert lines[0] == "fetch model.gguf: 125/1117 MB (11%)"
    assert lines[-1] == "fetch model.gguf: 1117/1117 MB (100%)"


def test_a_short_task_off_a_terminal_writes_one_line_and_a_transient_one_none():
    out, clock = io.StringIO(), _Clock()
    progress = bar(6, "bench", "runs", file=out, clock=clock)
    progress.set_postfix_str("lte adaptive prompt 2")
    progress.update(6)
    progress.close()
    progress.close()
    assert out.getvalue() == "bench: 6/6 runs (100%), lte adaptive prompt 2\n"
    quiet = io.StringIO()
    with bar(10, "verify", "B", file=quiet, leave=False, clock=clock) as hidden:
        hidden.update(10)
    assert quiet.getvalue() == ""


def test_on_a_terminal_progress_is_tqdm():
    from tqdm import tqdm

    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        progress = bar(3, "bench", "runs", file=terminal)
        assert isinstance(progress, tqdm) and not isinstance(progress, LineProgress)
        progress.update(3)
        progress.close()
    os.close(leader)
