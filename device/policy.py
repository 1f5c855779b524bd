"""How far to speculate each round, as named on the command line and in the bench.

  cloud-ar                      the cloud decodes alone and streams (the baseline)
  fixed:G                       G drafted tokens every round (0 = one plain target step)
  adaptive[:budget=J]           the scheduler: most tokens/s, J/token <= budget if given
  adaptive-energy[:floor=R,budget=J]
                                the scheduler: fewest J/token, tokens/s >= floor if given
  BASE+pipelined                while a verdict is in flight, draft the next block on the guess
                                that everything is accepted (kept when the guess holds)
  BASE+early-exit               pipelined, and the verifier's mid-pass hint redirects the guess
  ADAPTIVE+no-stream            the scheduler speculates in every round: cloud streaming is not
                                among its modes (by default a request starts streaming while the
                                draft prefills, and the scheduler switches between the two)
  pipelined[:G], early-exit[:G] shorthands for fixed:G+pipelined, fixed:G+early-exit (G = 4)
Options left out of an adaptive spec come from the device's current objective
([energy] in the config, changeable at run time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from specedge.protocol.wire import MAX_DRAFT


@dataclass(frozen=True)
class Policy:
    name: str
    # fixed: tokens drafted per round; adaptive: the wire's MAX_DRAFT, for the device's own cap is
    # the scheduler's (Scheduler.draft_cap: speculation.max_draft), changed at run time with it
    draft_len: int
    autoregressive: bool = False  # cloud-ar: the cloud generates alone and streams tokens
    adaptive: bool = False
    overrides: dict = field(default_factory=dict)  # Objective fields an adaptive spec sets
    pipelined: bool = False  # draft ahead while the verdict is in flight
    early_exit: bool = False  # ask the verifier for early-exit hints and draft ahead from them
    stream: bool = False  # adaptive: cloud streaming is one of the scheduler's modes

    def next_draft_len(self, remaining: int) -> int:
        """This round's draft length: never past the request's end (the verdict always adds one
        target token)."""
        return max(0, min(self.draft_len, remaining - 1))


_OPTION_FIELDS = {"budget": "budget_j_per_token", "floor": "min_tokens_per_s"}


def _adaptive(spec: str, mode: str, options: str) -> Policy:
    overrides: dict = {"mode": mode}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in _OPTION_FIELDS:
            raise ValueError(f"policy {spec!r}: unknown option {key!r}; use budget=J_PER_TOKEN or floor=TOKENS_PER_S")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"policy {spec!r}: {key} needs a number, got {value!r}") from None
        if not number > 0:
            raise ValueError(f"policy {spec!r}: {key} must be > 0")
        overrides[_OPTION_FIELDS[key]] = number
    return Policy(spec, MAX_DRAFT, adaptive=True, overrides=overrides, stream=True)


DEFAULT_PIPELINED_DRAFT = 4
_MODIFIERS = ("pipelined", "early-exit", "no-stream")


def fixed_policy(draft_len: int, pipelined: bool = False, early_exit: bool = False) -> Policy:
    """fixed:G (+pipelined, +early-exit) built directly from its draft length."""
    if not 0 <= draft_len <= MAX_DRAFT:
        raise ValueError(f"fixed policy: draft length {draft_len} is not in 0..{MAX_DRAFT}")
    name = f"fixed:{draft_len}" + ("+early-exit" if early_exit else "+pipelined" if pipelined else "")
    return Policy(name, draft_len, pipelined=pipelined or early_exit, early_exit=early_exit)


def parse_policy(spec: str, max_draft: int = MAX_DRAFT) -> Policy:
    """`max_draft`: the device's speculation.max_draft, the most a fixed:G may draft (never above
    the wire's MAX_DRAFT); an adaptive policy's rounds are capped by the scheduler's draft_cap."""
    max_draft = min(max_draft, MAX_DRAFT)
    base, *modifiers = spec.split("+")
    kind, _, arg = base.partition(":")
    if kind in ("pipelined", "early-exit") and not modifiers:  # shorthand: a fixed draft length, pipelined
        policy = _fixed(spec, arg or str(DEFAULT_PIPELINED_DRAFT), max_draft)
        return Policy(spec, policy.draft_len, pipelined=True, early_exit=kind == "early-exit")
    for m in modifiers:
        if m not in _MODIFIERS:
            raise ValueError(f"policy {spec!r}: unknown modifier {m!r}; use +pipelined, +early-exit or +no-stream")
    policy = _parse_base(base, max_draft)
    if modifiers:
        if policy.autoregressive:
            raise ValueError(f"policy {spec!r}: cloud-ar drafts nothing to pipeline")
        if "no-stream" in modifiers and not policy.adaptive:
            raise ValueError(f"policy {spec!r}: only an adaptive policy streams, so only it takes +no-stream")
        early = "early-exit" in modifiers
        policy = Policy(spec, policy.draft_len, adaptive=policy.adaptive, overrides=policy.overrides,
                        pipelined=early or "pipelined" in modifiers, early_exit=early,
                        stream=policy.stream and "no-stream" not in modifiers)
    return policy


def _fixed(spec: str, arg: str, max_draft: int) -> Policy:
    if arg.isdigit() and int(arg) <= max_draft:
        return Policy(spec, int(arg))
    raise _unknown(spec, max_draft)


def _parse_base(spec: str, max_draft: int) -> Policy:
    if spec == "cloud-ar":
        return Policy(spec, 0, autoregressive=True)
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        return _fixed(spec, arg, max_draft)
    if kind == "adaptive":
        return _adaptive(spec, "throughput", arg)
    if kind == "adaptive-energy":
        return _adaptive(spec, "energy", arg)
    raise _unknown(spec, max_draft)


def _unknown(spec: str, max_draft: int) -> ValueError:
    return ValueError(f"unknown policy {spec!r}: use cloud-ar, fixed:G with 0 <= G <= {max_draft}, "
                      f"adaptive[:budget=J] or adaptive-energy[:floor=R,budget=J], each optionally "
                      f"+pipelined or +early-exit (adaptive ones also +no-stream); or pipelined[:G], early-exit[:G]")

