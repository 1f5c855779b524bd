"""What one target pass may hold: the verifier fills each pass from its pending rounds (and the
capacity planner models it the same way)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassLimits:
    """What one target pass may hold; a round past a limit waits for the next pass.

    sessions     rounds in the pass (max_batch, and the engine's sequences)
    rows         positions fed: the pass's length, which every round in it waits out
    device_rows  positions fed for one device's rounds
    cells        KV positions the pass's sessions hold together after it (an engine whose
                 sessions share one cache: llama.cpp batched); 0: no such bound

    The first round of a pass always goes (a pass is never empty), and a device's first round
    always fits `device_rows` (a long prompt chunk still goes, alone of its device)."""

    sessions: int
    rows: int
    device_rows: int
    cells: int = 0


def fill_pass(rounds: list, limits: PassLimits, device_of, fed_of, held_of) -> tuple[list, list]:
    """(this pass, the rounds that wait) from `rounds` in order: each is taken if it fits what
    the rounds taken before it left. `fed_of(r)`: the positions it feeds, `held_of(r)`: the
    positions its session holds after the pass."""
    taken, rest, fed, held, by_device = [], [], 0, 0, {}
    for r in rounds:
        n, h, device = fed_of(r), held_of(r), device_of(r)
        fits = not taken or (len(taken) < limits.sessions and fed + n <= limits.rows
                             and (not limits.cells or held + h <= limits.cells)
                             and (device not in by_device or by_device[device] + n <= limits.device_rows))
        if fits:
            taken.append(r)
            fed, held, by_device[device] = fed + n, held + h, by_device.get(device, 0) + n
        else:
            rest.append(r)
    return taken, rest
