"""Each device's share of the target: while a lighter device has work, the heavier wait.

Terms:
- A device's *service* is the target time spent on it: each pass's compute time, split over its
  rounds by the positions each fed, and the time its messages took to handle. It is decayed by
  half every HALF_LIFE_S, so it measures recent use: a device that used the whole target
  without pause holds SPAN = HALF_LIFE_S / ln 2 seconds of it.
- A device is *active* while it sent something, or had a round answered, in the last ACTIVE_S
  seconds; *busy* likewise within IDLE_S (a device drafting its next round is busy).
- Its *fair share* is SPAN / (active devices not suspect, below). A device is *over its share*
  when its service exceeds `slack` times that; alone, a device is never over, nor beside suspect
  devices only (they have no share to be measured against: a device that uses the whole target
  beside an attacker is not made to wait for it).
- A device is *suspect* after it sent what the protocol forbids and an honest device does not
  send (`strike`: a malformed or refused request, a stream it no longer hears, a flood of stale
  rounds): each strike weighs in a score that halves every SUSPECT_HALF_LIFE_S, suspect while
  it is over SUSPECT_SCORE, so a single bad request makes a device suspect for that long. A
  suspect device counts as over its share whatever its service.

The rule (`Shares.plan`): a pass takes the pending rounds of devices within their share. Those
of devices over it wait while any such round is pending: they run in the others' idle time
(while they draft, or their answers travel). A pass of over-share rounds alone is kept to about
`yield_s` of target time (by the positions it feeds, at the measured time per position), so a
lighter device's round that arrives meanwhile waits at most that long. Where even the
smallest pass of the oldest over-share round would take longer (a stream step on a slow target,
a prompt call the engine cannot split), it waits until no lighter device has sent anything for
IDLE_S, or it has waited `hold_s`: the bound on what a lighter device can lose to it. A
suspect device's rounds wait so whatever their size and however long: it gets the others' idle
time only (`hold_s` bounds an honest device's wait, not an attacker's). While
it is over its share and a lighter device is busy, its messages wait in the same way (`gated`):
handling one is target time too (an OPEN under a grammar walks its whole text).

What this buys on a per-row (compute-bound) target: a device that floods the verifier with
long prompts and streams slows the others by about one `yield_s` a round instead of taking the
target from them. What it costs: on a flat (memory-bound) target, a device over its share
loses co-batching with the lighter ones while they have work, and pays for it in its own speed
alone; on a target too slow for any pass to fit `yield_s`, it may wait up to `hold_s` a round
while the others are busy. Service decays, so a device that was heavy is light again soon after
it stops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

HALF_LIFE_S = 2.0
SPAN = HALF_LIFE_S / math.log(2)
ACTIVE_S = 5.0
IDLE_S = 1.0
SUSPECT_HALF_LIFE_S, SUSPECT_SCORE = 10.0, 0.5


@dataclass
class Shares:
    slack: float = 1.2  # 0: off, every round goes in the next pass as it comes
    yield_s: float = 0.05
    hold_s: float = 10.0
    service: dict = field(default_factory=dict)  # device -> (seconds, as of when)
    seen: dict = field(default_factory=dict)  # device -> when it last sent something
    position_s: float = 0.0  # the target's recent seconds per fed position (0: not measured yet)
    strikes: dict = field(default_factory=dict)  # device -> (score, as of when)

    def used(self, device, now: float) -> float:
        return _decayed(self.service, device, now, HALF_LIFE_S)

    def charge(self, device, seconds: float, now: float) -> None:
        self.service[device] = (self.used(device, now) + seconds, now)

    def strike(self, device, weight: float, now: float) -> None:
        self.strikes[device] = (self.score(device, now) + weight, now)

    def score(self, device, now: float) -> float:
        return _decayed(self.strikes, device, now, SUSPECT_HALF_LIFE_S)

    def suspect(self, device, now: float) -> bool:
        return device in self.strikes and self.score(device, now) > SUSPECT_SCORE

    def touch(self, device, now: float) -> None:
        self.seen[device] = now

    def charge_pass(self, fed: list[tuple[object, int]], seconds: float, now: float) -> None:
        """A pass of `seconds` that fed (device, positions) for each of its rounds."""
        total = sum(n for _, n in fed)
        if not total:
            return
        for device, n in fed:
            self.charge(device, seconds * n / total, now)
        per = seconds / total
        self.position_s = per if not self.position_s else 0.8 * self.position_s + 0.2 * per

    def over(self, now: float) -> set:
        """The active devices over their share (none while fewer than two are active or it is off)."""
        for device in [d for d, t in self.seen.items() if now - t > ACTIVE_S]:
            del self.seen[device]
            if self.used(device, now) < 1e-3:
                self.service.pop(device, None)
            if self.score(device, now) < 1e-3:
                self.strikes.pop(device, None)
        if not self.slack or len(self.seen) < 2:
            return set()
        honest = self._honest(now)
        return {d for d in self.seen if self._over(d, now, honest)}

    def _honest(self, now: float) -> int:
        return sum(1 for d in self.seen if not self.suspect(d, now))

    def _over(self, device, now: float, honest: int | None = None) -> bool:
        """Over its share, or suspect; with two or more active devices (over's sweep aside).
        `honest`: the active devices not suspect, where the caller counted them already."""
        if self.suspect(device, now):
            return True
        used = self.used(device, now)
        if used <= self.slack * SPAN / len(self.seen):  # within even the smallest share: no count needed
            return False
        honest = self._honest(now) if honest is None else honest
        return honest >= 2 and used > self.slack * SPAN / honest

    def gated(self, device, now: float) -> bool:
        """Whether `device` is over its share while a lighter device is busy (sent something in
        the last IDLE_S): then its messages wait too (the verifier's backlog)."""
        if not self.slack or len(self.seen) < 2 or not self._over(device, now):
            return False  # most messages: a device within its share, told without a look at the others
        over = self.over(now)
        return device in over and self.lighter_busy(over, now)

    def lighter_busy(self, over: set, now: float) -> bool:
        return any(now - t < IDLE_S for d, t in self.seen.items() if d not in over)

    def budget(self) -> int:
        """Positions a pass of over-share rounds alone may feed (at least one)."""
        return max(1, int(self.yield_s / self.position_s)) if self.position_s else 1

    def plan(self, pending: list, device_of, positions_of, since_of, now: float) -> tuple[list, list, int]:
        """(this pass's rounds, those that wait, the most positions a cold session may feed in
        this pass: 0 = the verifier's prefill_chunk) from `pending`, oldest first. `device_of(p)`
        names a round's device, `positions_of(p, chunk)` what it would feed with that chunk,
        `since_of(p)` when it came."""
        over = self.over(now)
        if not over:
            return pending, [], 0
        light = [p for p in pending if device_of(p) not in over]
        if light:
            return light, [p for p in pending if device_of(p) in over], 0
        # Only heavier devices have work: the lighter ones are drafting, and come back soon.
        budget, busy = self.budget(), self.lighter_busy(over, now)

        def waits(p) -> bool:  # for the lighter devices to go idle
            return busy and (self.suspect(device_of(p), now) or (
                now - since_of(p) < self.hold_s and positions_of(p, budget) > budget))
        taken, fed = [], 0
        for p in (p for p in pending if not waits(p)):
            n = positions_of(p, budget)
            if taken and fed + n > budget:
                break
            taken.append(p)
            fed += n
        chosen = {id(p) for p in taken}
        return taken, [p for p in pending if id(p) not in chosen], budget if taken else 0


def _decayed(table: dict, device, now: float, half_life_s: float) -> float:
    """`table[device]`, a (value, as of when) pair, halved every `half_life_s` since."""
    value, when = table.get(device, (0.0, now))
    return value * 0.5 ** ((now - when) / half_life_s)
