"""One device session on the target: committed text, KV cache, verification of drafts.

No I/O here: the verifier service feeds it decoded messages.
Invariant: the cache holds every committed token but the last, which is fed
together with the next draft so one forward pass yields len(draft) + 1 rows.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from specedge.model import Qwen2
from specedge.speculative import (SamplingParams, SparseDist, greedy_verify, sample_dense,
                                  speculative_verify, target_distribution)


class OutOfSync(Exception):
    pass


class BadRequest(Exception):
    pass


class TargetSession:
    def __init__(self, model: Qwen2, tokens: list[int], params: SamplingParams, session_id: int):
        self.model, self.params = model, params
        self._check_ids(tokens)
        if len(tokens) + 1 > model.cfg.max_seq_len:
            raise BadRequest(f"{len(tokens)} tokens exceed the target's context of {model.cfg.max_seq_len}")
        self.committed = list(tokens)
        self.cache = model.new_cache(capacity=len(tokens) + 128)
        if len(tokens) > 1:
            model.forward(tokens[:-1], self.cache, last_only=True)
        self.rng = np.random.default_rng([params.seed, session_id])
        self.last_seq = 0
        self.last_reply: bytes | None = None
        self.last_used = time.monotonic()
        self.hints = False  # the device asked for early-exit hints

    def _check_ids(self, tokens) -> None:
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise BadRequest(f"token id outside the target's vocabulary of {vocab}")

    def sync(self, committed: int, allow_rollback: bool = False) -> None:
        """Make the session's committed length equal the device's."""
        if committed == len(self.committed):
            return
        if allow_rollback and 1 <= committed < len(self.committed):
            del self.committed[committed:]
            self.cache.truncate(committed - 1)
            return
        raise OutOfSync(f"device has {committed} committed tokens, verifier {len(self.committed)}")

    def _pick(self, logits_row: torch.Tensor) -> int:
        if self.params.greedy:
            return int(torch.argmax(logits_row))
        return sample_dense(target_distribution(logits_row.numpy(), self.params), self.rng)

    def verify(self, draft: list[int], q: list[SparseDist] | None, exit_head=None, on_hint=None) -> tuple[int, int]:
        """One target pass over the draft: (accepted count, the target's next token).
        With an exit head, `on_hint(accepted, token, confidence)` gets the verdict the intermediate
        layer predicts (greedy rule on its guesses), mid-pass, before the remaining layers run;
        confidence = the exit's least probability among the guesses that decide it."""
        self._check_ids(draft)
        if (q is None) != self.params.greedy:
            raise BadRequest("sampled sessions need q with every draft, greedy ones none")
        if len(self.committed) + len(draft) + 1 > self.model.cfg.max_seq_len:
            raise BadRequest("draft runs past the target's context")
        hook = None
        if exit_head is not None and on_hint is not None:
            def hook(index, hidden):
                if index == exit_head.layer:
                    top = torch.softmax(exit_head.logits(hidden), dim=-1).max(dim=-1)
                    accepted, token = greedy_verify(draft, top.indices.tolist())
                    on_hint(accepted, token, float(top.values[: accepted + 1].min()))
        logits = self.model.forward([self.committed[-1]] + draft, self.cache, on_layer=hook)
        if self.params.greedy:
            accepted, token = greedy_verify(draft, torch.argmax(logits, dim=-1).tolist())
        else:
            p = np.stack([target_distribution(row, self.params) for row in logits.numpy()])
            accepted, token = speculative_verify(draft, q, p, self.rng)
        self.cache.truncate(len(self.committed) + accepted)
        self.committed += draft[:accepted] + [token]
        return accepted, token

    def step(self) -> int:
        """One autoregressive target step (the cloud-only baseline)."""
        if len(self.committed) + 1 > self.model.cfg.max_seq_len:
            raise BadRequest("generation runs past the target's context")
        token = self._pick(self.model.forward([self.committed[-1]], self.cache)[-1])
        self.committed.append(token)
        return token
