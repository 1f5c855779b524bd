"""The compatibility contract between a frozen draft and a target version.

A draft can speculate for a target only if both read and write the same token
ids: same tokenizer (vocabulary and merges), same vocabulary size, same special
tokens, same chat template (the prompt the device renders is the prompt the
target sees). Each part is a short hash so the device sends it in OPEN and the
verifier names exactly which part differs when it refuses.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


def _hash8(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:8]


# Conversations the product renders: the template is compared by what it makes of them, so two
# templates that differ only in branches never taken here (tool calls) still match. (The 0.5B and
# 1.5B Qwen2.5-Coder files differ exactly so: one escapes braces in the tool-call instructions.)
_PROBES = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
)


def _rendered_template(tokenizer) -> str:
    if not tokenizer.chat_template:
        return ""
    return "\x00".join(tokenizer.apply_chat_template(messages) for messages in _PROBES)


@dataclass(frozen=True)
class Contract:
    tokenizer: bytes  # 8 bytes: vocabulary and merges
    vocab_size: int  # rows of the model's output head
    special_tokens: bytes  # 8 bytes: ids of eos, bos and the stop tokens
    chat_template: bytes  # 8 bytes: the template's rendering of a few conversations

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "Contract":
        specials = f"eos={tokenizer.eos_id} bos={tokenizer.bos_id} stop={sorted(tokenizer.stop_ids)}"
        return cls(bytes.fromhex(tokenizer.fingerprint()), int(vocab_size), _hash8(specials),
                   _hash8(_rendered_template(tokenizer)))

    @classmethod
    def unchecked(cls) -> "Contract":
        """All zeros: a client that does not state its contract (tools, tests); nothing is checked."""
        return cls(bytes(8), 0, bytes(8), bytes(8))

    @property
    def is_unchecked(self) -> bool:
        return self == Contract.unchecked()

    def mismatch(self, target: "Contract") -> str | None:
        """Why a draft with this contract cannot speculate for `target`, or None if it can."""
        if self.is_unchecked:
            return None
        for part in ("tokenizer", "vocab_size", "special_tokens", "chat_template"):
            mine, theirs = getattr(self, part), getattr(target, part)
            if mine != theirs:
                show = (lambda v: v.hex()) if isinstance(mine, bytes) else str
                return f"{part.replace('_', ' ')} differs: draft {show(mine)}, target {show(theirs)}"
        return None

    def to_json(self) -> dict:
        return {"tokenizer": self.tokenizer.hex(), "vocab_size": self.vocab_size,
                "special_tokens": self.special_tokens.hex(), "chat_template": self.chat_template.hex()}
