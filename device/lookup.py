"""Prompt-lookup drafting: the tokens that followed the latest earlier occurrence of the text's
last n tokens, looked up in the prompt and everything generated since. It costs no model pass
and wins where the answer copies its input: code edits, JSON that echoes its request, quotes.
vLLM's ngram proposer and llama.cpp's prompt lookup draft the same way.

Terms:
    text     the committed tokens (prompt and output so far)
    n-gram   the text's last n tokens, for n from `max_ngram` down to `min_ngram`: the longest
             suffix that occurred before wins, the latest of its occurrences first
    proposal up to `draft_len` tokens that followed that occurrence

A proposal is a draft like any other: the verifier's rule decides. Sampled, its q is a point
mass on each proposed token, which speculative sampling keeps exact (accept with p(x), else
draw from p without x, renormalised), so exactness never depends on where a draft came from.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from specedge.device.draft import Drafted
from specedge.speculative import Q_ONE, SamplingParams, SparseDist

MIN_NGRAM = 2  # one matching token proposes too often to pay for the verifier's rows
MAX_NGRAM = 4
WINDOW = 4096  # the latest tokens searched: the cost of a lookup stays bounded on long texts


def propose(text, draft_len: int, min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `draft_len` tokens that followed the latest earlier occurrence of the longest suffix
    of `text` (n tokens, max_ngram >= n >= min_ngram) that occurred before; [] when none did."""
    arr = np.asarray(text[-WINDOW:], dtype=np.int64)
    if draft_len <= 0:
        return []
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(arr) <= n:
            continue
        # Windows start at 0 .. len - 1 - n, so every one is followed by a token and none is
        # the suffix itself.
        starts = np.nonzero((sliding_window_view(arr[:-1], n) == arr[-n:]).all(axis=1))[0]
        if starts.size:
            follow = int(starts[-1]) + n
            return arr[follow:follow + draft_len].tolist()
    return []


def drafted(text, draft_len: int, params: SamplingParams, stop_ids=frozenset()) -> Drafted | None:
    """The proposal as a draft (up to and including a stop token: nothing after one is worth
    verifying), its q a point mass on each token when sampled; None when there is none."""
    tokens = propose(text, draft_len)
    for i, token in enumerate(tokens):
        if token in stop_ids:
            tokens = tokens[: i + 1]
            break
    if not tokens:
        return None
    q = None if not params.sends_q else [SparseDist(np.array([t], dtype=np.uint32), np.array([Q_ONE])) for t in tokens]
    return Drafted(tokens, q, [1.0] * len(tokens), 0.0, "lookup")
