"""The emulated draft backend (`[draft] backend = "emulated"`, model = an emulation file): the
draft engine interface (device/draft.py), its drafting loop unchanged, each step's logits made
from a recording of the real draft's greedy steps (specedge/emulation.py) and each feed held for
the time the draft's profile gives it. Greedy only.

A step past what was recorded (a text the real draft was never run on) proposes FILLER, which no
target row names, and is counted: the run's report says how many there were.
"""
from __future__ import annotations

import math
import time

import numpy as np

from specedge.device.draft import DraftEngine
from specedge.emulation import Held, Recording, Recordings, draft_feed_ms, read_bundle

FILLER = 0  # proposed past the recording; a row off the target's path never names it


class EmulatedDraftEngine(DraftEngine):
    backend = "emulated"

    def __init__(self, bundle: dict, q_top_k: int = 8, q_top_p: float = 0.98):
        super().__init__(q_top_k, q_top_p)
        self.profile = bundle["draft_profile"]
        self.vocab_size = int(bundle["draft"]["vocab_size"])
        self.recordings = Recordings([Recording.from_json(r) for r in bundle["recordings"]])
        self.text: list[int] = []
        self.unrecorded = 0  # steps the recording could not answer
        self.held = Held()
        self._prefilling = False

    @classmethod
    def load(cls, path, q_top_k: int = 8, q_top_p: float = 0.98) -> "EmulatedDraftEngine":
        return cls(read_bundle(path), q_top_k, q_top_p)

    def start(self, committed: list[int], reuse: bool = True) -> None:
        self._prefilling = True  # a prefill's logits are nobody's step
        try:
            super().start(committed, reuse)
        finally:
            self._prefilling = False

    def _reset(self, capacity: int) -> None:
        self.text = []

    def _truncate(self, length: int) -> None:
        del self.text[length:]

    def _feed(self, tokens: list[int]) -> np.ndarray:
        t0 = time.perf_counter()
        seconds = draft_feed_ms(self.profile, len(self.text), len(tokens)) / 1000
        self.text += tokens
        recording = self.recordings.find(self.text)
        step = recording.draft_next(self.text) if recording else None
        if step is None:
            self.unrecorded += not self._prefilling
            step = (FILLER, 1.0)
        logits = _logits(self.vocab_size, *step)
        self.held.until(t0, seconds)
        return logits

    def emulation(self) -> dict:
        """How the emulation went so far (Held.report: a pass is a feed), and steps past the recording."""
        return {**self.held.report(), "unrecorded_steps": self.unrecorded}


def _logits(vocab: int, token: int, probability: float) -> np.ndarray:
    """Logits whose softmax gives `token` the recorded probability and every other token the rest
    in equal parts: the draft's argmax and its confidence, which is all a greedy draft reads."""
    p = min(max(probability, 1e-9), 1 - 1e-7)
    out = np.full(vocab, math.log((1 - p) / (vocab - 1)) - math.log(p), dtype=np.float32)
    out[token] = 0.0
    return out
