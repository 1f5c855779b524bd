"""When a target pass is due and what it may hold: the verifier fills each pass from its pending
rounds (and the capacity planner models it the same way)."""
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


def wait_for_more(arrivals: list[float], active: int, streams_only: bool, opened: float, window: float,
                  now: float) -> float | None:
    """How long the next pass may wait for more rounds, or None where it is due now.

    arrivals      when each pending round arrived (none: wait for the first, 0.2 s at a time)
    active        sessions that could send a round (those answered lately)
    streams_only  every pending round is a cloud-ar step
    opened        when this gathering began: what queued during the last pass joins whatever its
                  age, the window only bounds how long to wait for more

    Due when everyone who could join has (waiting would only add latency), when only streams
    wait (the verifier sets their pace, and a round that comes during the pass joins the next,
    one short pass away: waiting for the devices between rounds made every stream a 5 ms wait
    per 7.5 ms pass slower), or when the oldest round has waited the window."""
    if not arrivals:
        return 0.2
    if len(arrivals) >= active or streams_only:
        return None
    timeout = max(opened, min(arrivals)) + window - now
    return timeout if timeout > 0 else None
