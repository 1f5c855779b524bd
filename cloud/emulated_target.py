"""The emulated target engine: the verifier's engine interface (cloud/engine.py), answered from a
recording of the real target's own greedy generation (specedge/emulation.py) and holding each
pass for the time the target's profile gives a pass of its shape. Everything around it (the
verifier's sessions, batching, chunks, KV budget, MQTT) runs unchanged.

A row after a text on the recorded path names the path's next token (logit 1 there, 0 elsewhere);
any other row is NaN: greedy acceptance never reads one (tests/test_emulation.py), and anything
else that did would show it. Greedy only: the engine stands for the target's argmax, not its
distribution.
"""
from __future__ import annotations

import time

import torch

from specedge.cloud.engine import Shape, feeds
from specedge.emulation import Fed, Held, Recording, Recordings, fed_alone, read_bundle, target_pass_ms


class EmulatedCache:
    """A session's text as the engine holds it; bytes as the profile says a position costs."""

    def __init__(self, engine: "EmulatedTarget"):
        self.engine, self.tokens, self.recording = engine, [], None

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot truncate a cache of {len(self.tokens)} positions to {length}")
        del self.tokens[length:]

    def nbytes(self) -> int:
        return len(self.tokens) * self.engine.bytes_per_token


class EmulatedTarget:
    engine = "emulated"
    hints = False
    batch_invariant = True
    block = 1
    candidates = (1,)

    def __init__(self, bundle: dict):
        from specedge.exactness import Exactness

        self.profile = bundle["target_profile"]
        shape = bundle["target"]
        self.cfg = Shape(shape["vocab_size"], shape["max_seq_len"], shape["n_layers"])
        self.bytes_per_token = int(self.profile["bytes_per_position"])
        self.prompt_batch = int(self.profile.get("prompt_batch", 0))
        self.recordings = Recordings([Recording.from_json(r) for r in bundle["recordings"]])
        self.tokenizer_path = shape["tokenizer"]
        self.off_path_rows = 0  # rows answered NaN: off the recording
        self.held = Held()
        # The recording is the real target's own generation: the emulation is as exact as it was.
        self.exactness = Exactness(True, 1, 0.0, (), "emulated",
                                   client=f"the recorded generation of {shape.get('model', 'the target')} "
                                          f"({self.profile.get('engine', '?')}; emulated compute)",
                                   client_equal=True)

    @classmethod
    def load(cls, path) -> "EmulatedTarget":
        return cls(read_bundle(path))

    def refuses(self, tokens: list[int]) -> str:
        """Why a session on this text cannot open ("" if it can): the engine stands for the target
        on its recording only, and answering anything else would make tokens up."""
        return "" if self.recordings.find(tokens) else "the emulated target has no recording of this prompt"

    def new_cache(self, capacity: int = 0) -> EmulatedCache:
        return EmulatedCache(self)

    def forward(self, tokens, cache: EmulatedCache, last_only: bool = False, on_layer=None) -> torch.Tensor:
        return self.forward_batch([(tokens, cache)], last_only, on_layer)[0]

    def forward_batch(self, sequences, last_only: bool = False, on_layer=None, keep=None, calls=None):
        t0 = time.perf_counter()
        tokens, caches, keep = feeds(self, sequences, last_only, on_layer, keep)
        calls = calls or [None] * len(tokens)
        shapes = [Fed(cache.length, len(toks), k, fed_alone(c, len(toks), k, self.prompt_batch))
                  for toks, cache, k, c in zip(tokens, caches, keep, calls)]
        out = []
        for toks, cache, k in zip(tokens, caches, keep):
            cache.tokens += toks
            out.append(self._rows(cache, k))
        self.held.until(t0, target_pass_ms(self.profile, shapes) / 1000)
        return out

    def _rows(self, cache: EmulatedCache, kept: int) -> torch.Tensor:
        if cache.recording is None:
            cache.recording = self.recordings.find(cache.tokens)
        rows = torch.full((kept, self.cfg.vocab_size), float("nan"))
        text = cache.tokens
        for r in range(kept):
            end = len(text) - kept + r + 1
            token = cache.recording.target_next(text[:end]) if cache.recording else None
            if token is None:
                self.off_path_rows += 1
                continue
            rows[r].zero_()
            rows[r, token] = 1.0
        return rows

    def emulation(self) -> dict:
        """How the emulation went so far (Held.report), and the rows asked off the recording."""
        return {**self.held.report(), "off_path_rows": self.off_path_rows}
