"""Emulated compute: the real product on a recording of the real models, each pass held for the
time an engine profile (`specedge profile`) gives it.

Terms:
  profile    what `specedge profile` measured of one engine on one machine (JSON): ms per pass
             by shape and context, ms per prompt token, bytes per cached position;
  path       the target's own greedy generation of a prompt (cloud/engine.py own_generation),
             and its stop token where it stopped;
  steps      the draft's greedy (token, probability) after the prompt and each prefix of the path;
  after      where the draft leaves the path at position m, its own next tokens from there.

Under greedy decoding the committed text is always the prompt and a prefix of the path: a draft
from position p follows the path while the draft's step there names the path's next token, and
acceptance reads target rows only up to the first drafted token off the path (the verdict's
next token is the path's). So one recording answers every round of every policy, any draft
length: the target's row after a text on the path names the path's next token, and the draft's
tokens are its recorded steps, then its recorded continuation where it leaves the path.
Sampled decoding reads the target's whole distribution at every row, which a recording of
argmaxes does not have: the emulation is greedy only.

Everything here is pure but Held, the clock both emulated engines hold their passes by
(cloud/emulated_target.py, device/emulated_draft.py).
"""
from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "specedge-emulation/1"
PROFILE_FORMAT = "specedge-profile/1"


def read_json(path: str | Path, fmt: str, what: str, writer: str) -> dict:
    """A JSON object whose "format" is `fmt` (the file of a `what`, as `writer` writes it); a
    ValueError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable {what} ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path}: not a {what} ({fmt}); {writer} writes them")
    return data


def read_profile(path: str | Path, kind: str) -> dict:
    """A profile of a `kind` ("target" or "draft") engine, checked enough to be used."""
    data = read_json(path, PROFILE_FORMAT, "profile", "`specedge profile`")
    if data.get("kind") != kind:
        raise ValueError(f"{path}: not a {kind} profile of `specedge profile` ({PROFILE_FORMAT})")
    for key in ("decode_ms", "prefill_ms_per_token", "bytes_per_position"):
        if key not in data:
            raise ValueError(f"{path}: the profile has no {key}")
    return data


def interpolate(points: dict, x: float) -> float:
    """Piecewise-linear through {x: y} (JSON keys are strings), flat beyond the ends."""
    xs = sorted((float(k), float(v)) for k, v in points.items())
    keys = [k for k, _ in xs]
    if x <= keys[0]:
        return xs[0][1]
    if x >= keys[-1]:
        return xs[-1][1]
    i = bisect.bisect_right(keys, x)
    (x0, y0), (x1, y1) = xs[i - 1], xs[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def prefill_ms(profile: dict, rows: int) -> float:
    """ms to feed `rows` prompt tokens in the engine's prompt calls."""
    return rows * interpolate(profile["prefill_ms_per_token"], rows) if rows > 0 else 0.0


def decode_ms(profile: dict, context: int) -> float:
    """ms of one row fed alone after `context` cached positions."""
    return interpolate(profile["decode_ms"], context)


def verify_ms(profile: dict, sessions: int, rows: float) -> float:
    """ms of a pass of `sessions` sessions x `rows` rows each at the grid's context: bilinear
    between measured cells; from the largest measured cell below, in proportion to the rows,
    where a corner was not measured (the profile's time budget) or past the grid's ends (what an
    engine that runs each row in a call of its own costs; a GPU's grid is measured whole)."""
    grid = profile.get("verify")
    if not grid:  # no grid: every row a decode step
        return sessions * rows * decode_ms(profile, profile.get("base_context", 0))
    ss, ks, ms = grid["sessions"], grid["rows"], grid["ms"]
    s, k = min(max(sessions, ss[0]), ss[-1]), min(max(rows, ks[0]), ks[-1])
    (s0, s1), (k0, k1) = _bracket(ss, s), _bracket(ks, k)
    at = {(a, b): ms[i][j] for i, a in enumerate(ss) for j, b in enumerate(ks) if ms[i][j] is not None}
    if all((a, b) in at for a in (s0, s1) for b in (k0, k1)):
        fs = 0.0 if s1 == s0 else (s - s0) / (s1 - s0)
        fk = 0.0 if k1 == k0 else (k - k0) / (k1 - k0)
        t = ((1 - fs) * (1 - fk) * at[s0, k0] + fs * (1 - fk) * at[s1, k0]
             + (1 - fs) * fk * at[s0, k1] + fs * fk * at[s1, k1])
    else:
        below = [c for c in at if c[0] <= s and c[1] <= k] or [min(at, key=lambda c: c[0] * c[1])]
        a, b = max(below, key=lambda c: c[0] * c[1])
        t = at[a, b] * s * k / (a * b)
    return t * sessions * rows / (s * k)


def _bracket(values: list, x: float) -> tuple:
    """The grid values either side of x (x inside the grid)."""
    i = bisect.bisect_left(values, x)
    return (values[i], values[i]) if values[i] == x else (values[i - 1], values[i])


@dataclass(frozen=True)
class Fed:
    """One sequence of a target pass: positions cached before it, rows fed, rows whose logits it
    keeps, and of the others those fed in a call of their own (llama.cpp re-reading a session's
    generated text, as its own generation fed it: a decode step each, not the prompt rate)."""

    context: int
    rows: int
    kept: int
    alone: int = 0


def fed_alone(calls: list[int] | None, rows: int, kept: int, prompt_batch: int) -> int:
    """Of `rows` fed in calls of these sizes (None: a row each), how many before the last `kept`
    go in a call of their own, on an engine whose prompts go in calls of `prompt_batch` rows (0: it
    groups rows as it likes, and every unkept row is at the prompt rate)."""
    if not prompt_batch:
        return 0
    alone = fed = 0
    for size in calls if calls is not None else [1] * rows:
        if fed >= rows - kept:
            break
        alone += size == 1
        fed += size
    return alone


def target_pass_ms(profile: dict, seqs: list[Fed]) -> float:
    """ms of one target pass: the prompt rows at the prefill rate (those fed a call each, a decode
    step each), the kept rows as a verify pass of the grid, and what attending over a longer
    context than the grid's adds (per row on an exact engine, which attends row by row; per
    session on one that batches a pass)."""
    if not seqs:
        return 0.0
    base = profile.get("base_context", 0)
    total = sum(prefill_ms(profile, s.rows - s.kept - s.alone)
                + s.alone * decode_ms(profile, s.context + s.rows - s.kept) for s in seqs)
    total += verify_ms(profile, len(seqs), sum(s.kept for s in seqs) / len(seqs))
    per_row = profile.get("context_cost", "per_row") == "per_row"
    for s in seqs:
        extra = max(0.0, decode_ms(profile, s.context + s.rows - s.kept) - decode_ms(profile, base))
        total += extra * (s.kept if per_row else 1)
    return total


class Held:
    """Holds each pass until its emulated time is up, and counts how this host kept up: passes,
    those whose own work ran more than 5 % past their time, the time held and the time late."""

    def __init__(self):
        self.passes = self.late_passes = 0
        self.held_s = self.late_s = 0.0

    def until(self, t0: float, seconds: float) -> None:
        left = t0 + seconds - time.perf_counter()
        if left > 0:
            time.sleep(left)
        self.passes += 1
        self.held_s += seconds
        if left < -0.05 * seconds:
            self.late_passes += 1
            self.late_s -= left

    def report(self) -> dict:
        return {"passes": self.passes, "late_passes": self.late_passes, "held_s": round(self.held_s, 3),
                "late_s": round(self.late_s, 3)}


def draft_feed_ms(profile: dict, context: int, rows: int) -> float:
    """ms of the draft's one feed of `rows` tokens after `context`: a decode step, or a prefill."""
    return decode_ms(profile, context) if rows == 1 else prefill_ms(profile, rows)


@dataclass
class Recording:
    """One prompt's path and the draft's steps along it (see the module's terms)."""

    prompt: list[int]
    path: list[int]
    steps: list[tuple[int, float]]  # len(path) + 1: after the prompt and each prefix of the path
    after: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def target_next(self, text: list[int]) -> int | None:
        """The target's next token after `text`, where `text` is the prompt and a prefix of the
        path, and the path goes on; None off the path."""
        k = len(text) - len(self.prompt)
        if 0 <= k < len(self.path) and self.on_path(text):
            return self.path[k]
        return None

    def draft_next(self, text: list[int]) -> tuple[int, float] | None:
        """The draft's greedy (token, probability) after `text`: its step on the path, its recorded
        continuation off it; None past what was recorded."""
        k = len(text) - len(self.prompt)
        if k < 0 or text[:len(self.prompt)] != self.prompt:
            return None
        on = _common(text, self.prompt + self.path)
        if on == len(text):
            return tuple(self.steps[k]) if k < len(self.steps) else None
        m = on - len(self.prompt)  # the path position where the text leaves it
        cont = self.after.get(m)
        if cont is None or text[on] != cont[0][0]:
            return None
        j = len(text) - on
        return tuple(cont[j]) if j < len(cont) and text[on:] == [t for t, _ in cont[:j]] else None

    def on_path(self, text: list[int]) -> bool:
        n = len(text)
        return n >= len(self.prompt) and text == (self.prompt + self.path)[:n]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "path": self.path, "steps": [list(s) for s in self.steps],
                "after": {str(m): [list(s) for s in c] for m, c in self.after.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Recording":
        return cls(list(d["prompt"]), list(d["path"]), [tuple(s) for s in d["steps"]],
                   {int(m): [tuple(s) for s in c] for m, c in d.get("after", {}).items()})


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Recordings:
    """Every prompt's recording, found by the text a session holds."""

    def __init__(self, recordings: list[Recording]):
        self.items = recordings

    def find(self, text: list[int]) -> Recording | None:
        best = None
        for rec in self.items:
            n = len(rec.prompt)
            if len(text) >= n and text[:n] == rec.prompt and (best is None or n > len(best.prompt)):
                best = rec
        return best


def record(target, draft_engine, prompts: list[list[int]], max_new: int, max_draft: int, stop_ids) -> list[Recording]:
    """Each prompt's path (max_new + max_draft + 1 tokens, so that any round's rows past max_new
    are on it), the draft's greedy step after each of its prefixes, and where a step leaves the
    path, the draft's next max_draft - 1 tokens from there: what the real draft engine drafts,
    step by step as the device does."""
    from specedge.cloud.engine import own_generation
    from specedge.speculative import SamplingParams

    greedy, long = SamplingParams(), max_new + max_draft + 1
    out = []
    for prompt, path in zip(prompts, own_generation(target, prompts, long, stop_ids, with_stop=True)):
        steps, after = [], {}
        draft_engine.start(prompt)
        for k in range(len(path) + 1):
            draft_engine.commit(prompt + path[:k])
            d = draft_engine.draft(1, greedy, None)
            steps.append((d.tokens[0], d.confidences[0]))
        for k, (token, confidence) in enumerate(steps[:-1]):
            if token != path[k] and token not in stop_ids and max_draft > 1:
                draft_engine.commit(prompt + path[:k] + [token])
                d = draft_engine.draft(max_draft - 1, greedy, None, stop_ids)
                after[k] = [(token, confidence)] + list(zip(d.tokens, d.confidences))
        out.append(Recording(prompt, path, steps, after))
    return out


def record_paths(target, prompts: list[list[int]], max_new: int, max_draft: int, stop_ids) -> list[Recording]:
    """The target's paths alone (no draft steps): enough for the emulated target, where the
    devices' drafts come from elsewhere (`bench-verifier` replays its own)."""
    from specedge.cloud.engine import own_generation

    paths = own_generation(target, prompts, max_new + max_draft + 1, stop_ids, with_stop=True)
    return [Recording(prompt, path, []) for prompt, path in zip(prompts, paths)]


def bundle(recordings: list[Recording], target_profile: dict, draft_profile: dict | None, target: dict,
           draft: dict | None) -> dict:
    """The emulation file: the recordings, the profiles, and what the emulated engines stand for
    (their shapes and the files their tokenizers are read from); no draft where only the target is
    emulated."""
    return {"format": FORMAT, "emulated": True, "target": target, "draft": draft,
            "target_profile": target_profile, "draft_profile": draft_profile,
            "recordings": [r.to_json() for r in recordings]}


def read_bundle(path: str | Path) -> dict:
    return read_json(path, FORMAT, "emulation file", "`specedge bench --emulate`")
