"""Drafting ahead while a verdict is in flight (PicoSpec), on one guessed outcome of it.

The guess (the "branch") is a verdict (accepted, next token): at first, that every
drafted token holds and the target's own token is the one the draft finds most
likely; an early-exit hint from the verifier may redirect it. The block drafted on
the branch is kept only when the verdict equals the branch exactly, so the next
round still drafts from the committed text and nothing the target decides depends
on the guess: greedy output stays identical, sampled output keeps its distribution
(the guess only picks which work is thrown away).
"""
from __future__ import annotations

from specedge.device.draft import Drafted
from specedge.speculative import SamplingParams

_GREEDY = SamplingParams()


class Ahead:
    def __init__(self, engine, committed: list[int], draft: list[int], params: SamplingParams, rng,
                 stop_ids, next_draft_len, keep_going=None):
        """`committed`: the text the draft in flight extends; `next_draft_len(accepted)`: the most
        tokens the next round may draft when the verdict accepts that many; `keep_going(confidences)`:
        the scheduler's test, as for any draft."""
        self.engine, self.committed, self.draft = engine, committed, draft
        self.params, self.rng, self.stop_ids = params, rng, stop_ids
        self.next_draft_len, self.keep_going = next_draft_len, keep_going
        self.branch: tuple[int, int] | None = None
        self.follow_hints = True  # the scheduler may say early-exit hints lose here (Scheduler.follow_hint)
        self.block = Drafted.empty(params)
        self.seconds = 0.0  # all drafting ahead, kept or not
        self.tokens = 0
        # A draft ending on a stop token ends the request when it is all accepted.
        self.finished = bool(draft) and draft[-1] in stop_ids

    def wants_more(self) -> bool:
        if self.finished:
            return False
        if self.branch is None:
            return True
        accepted, token = self.branch
        block = self.block.tokens
        if token in self.stop_ids or (block and block[-1] in self.stop_ids):
            return False
        if len(block) >= self.next_draft_len(accepted):
            return False
        return self.keep_going is None or self.keep_going(self.block.confidences)

    def step(self) -> None:
        """Draft one token ahead: first the bet on the target's token, then the next block."""
        if self.branch is None:
            # Coupled, the target's token is its choice under the position's noise: guess that.
            guess = self.engine.draft(1, self.params if self.params.coupled else _GREEDY, self.rng)
            self.branch = (len(self.draft), guess.tokens[0])
            self.seconds += guess.seconds
        else:
            more = self.engine.draft(1, self.params, self.rng, self.stop_ids)
            self.block.extend(more)
            self.seconds += more.seconds
            self.tokens += len(more.tokens)

    def redirect(self, accepted: int, token: int) -> None:
        """An early-exit hint predicts this verdict: bet on it instead (work on another branch goes)."""
        if self.finished or (accepted, token) == self.branch or not 0 <= accepted <= len(self.draft):
            return
        self.engine.commit(self.committed + self.draft[:accepted] + [token])
        self.branch = (accepted, token)
        self.block = Drafted.empty(self.params)

    def resolve(self, accepted: int, token: int, committed: list[int]) -> Drafted | None:
        """The verdict is in and `committed` is the new committed text: the block drafted ahead if the
        bet held (the engine stands after it), else None (the engine is back at `committed`)."""
        if self.branch == (accepted, token) and committed == self.committed + self.draft[:accepted] + [token]:
            self.engine.commit(committed + self.block.tokens)
            return self.block
        self.engine.commit(committed)
        return None
