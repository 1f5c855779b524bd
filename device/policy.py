"""How far to speculate each round. Policies are pure: state in, draft length out."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    name: str
    draft_length: int  # tokens drafted per round; 0 = one plain target step per round
    autoregressive: bool = False  # cloud-ar: the cloud generates alone and streams tokens

    def next_draft_length(self, remaining: int) -> int:
        """Never draft past the request's end: the verdict always adds one target token."""
        return max(0, min(self.draft_length, remaining - 1))


def parse_policy(spec: str, max_draft: int = 64) -> Policy:
    """'cloud-ar' or 'fixed:G' (0 <= G <= max_draft)."""
    if spec == "cloud-ar":
        return Policy(spec, 0, autoregressive=True)
    kind, _, arg = spec.partition(":")
    if kind == "fixed" and arg.isdigit() and int(arg) <= max_draft:
        return Policy(spec, int(arg))
    raise ValueError(f"unknown policy {spec!r}: use cloud-ar or fixed:G with 0 <= G <= {max_draft}")
