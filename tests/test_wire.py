"""The wire protocol: every message round-trips; bad payloads are rejected with the right error."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge.grammar import grammar_hash
from specedge.protocol import wire
from specedge.protocol.contract import Contract
from specedge.speculative import SamplingParams, quantize, softmax

GRAMMAR = '{"grammars": [{"json_schema": {"type": "object"}}]}'
Q = [quantize(softmax(np.array([3.0, 1.0, 0.5, 0.0, -2.0])), 3, 1.0)]
MESSAGES = [
    wire.Open(2**32 - 5, 0, [1, 2, 151935], SamplingParams(0.7, 20, 0.9, 42),
              Contract(b"abcdefgh", 151936, b"ijklmnop", b"qrstuvwx"), True, draft="qwen2.5-coder-0.5b-l12"),
    wire.Open(5, 0, [7], SamplingParams(), Contract.unchecked(), False, hints=True),
    wire.Draft(7, 3, 100, [4, 5, 6]),
    wire.Draft(7, 4, 100, [int(Q[0].ids[0])], Q),
    wire.Draft(7, 4, 100, [int(Q[0].ids[1]), int(Q[0].ids[2])], Q * 2),
    wire.Draft(7, 5, 100, []),
    wire.Generate(9, 1, 20, 64),
    wire.Close(9, 2),
    wire.Extend(9, 3, 120, [5, 151935, 6], wire.text_hash([1] * 120)),
    wire.Verdict(7, 3, 100, 2, 151000, 12300),  # verify time travels in 100 µs units
    wire.Hint(7, 3, 100, 1, 151000, 21),
    wire.Draft(7, 6, 3, [4], text_hash=wire.text_hash([1, 2, 3])),
    wire.Verdict(7, 6, 3, 1, 5, 1000, text_hash=wire.text_hash([1, 2, 3])),
    wire.Tokens(9, 1, 20, [3, 4, 5], True),
    wire.Error(7, 3, wire.ErrorCode.OUT_OF_SYNC, "resync, please ✓"),
    wire.Opened(5, 3, "verifier-a", "coder-1.5b-pruned"), wire.Opened(5, 4, "verifier-a", "coder-1.5b", exact=True),
    wire.Open(5, 0, [7, 8, 9], grammar_hash=grammar_hash(GRAMMAR), grammar=GRAMMAR, grammar_from=3),
    wire.Open(5, 0, [7, 8, 9], grammar_hash=grammar_hash(GRAMMAR), grammar_from=2),  # by hash alone
    wire.Draft(7, 7, 100, [int(Q[0].ids[0])], Q, forced=[123, 151935]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    decoded = wire.decode(wire.encode(msg))
    assert type(decoded) is type(msg)
    for key, value in vars(msg).items():
        got = getattr(decoded, key)
        if key == "q" and value is not None:
            assert [(d.ids.tolist(), d.counts.tolist()) for d in got] == [(d.ids.tolist(), d.counts.tolist())
                                                                          for d in value]
        elif key == "params":
            assert got.top_k == value.top_k and got.seed == value.seed
            assert got.temperature == pytest.approx(value.temperature) and got.top_p == pytest.approx(value.top_p)
        else:
            assert got == value


def test_drafts_are_compact():
    # 10-byte header + committed (4) + the committed text's 8-byte hash + count and q flag (1) + 3 per token id
    assert len(wire.encode(wire.Draft(1, 1, 10, [1, 2, 3, 4]))) == 10 + 13 + 12
    # committed, hash, accepted (1), next token (4), verify time (2)
    assert len(wire.encode(wire.Verdict(1, 1, 10, 2, 3))) == 10 + 19
    # sampled: per drafted token its q (k entries of 3 + 2 bytes) plus 2 bytes, the token named by its place
    sampled = wire.Draft(1, 1, 10, [int(Q[0].ids[0])] * 2, Q * 2)
    assert len(wire.encode(sampled)) == 10 + 13 + 2 * (2 + 5 * len(Q[0].ids))
    assert wire.decode(wire.encode(wire.Verdict(1, 1, 10, 2, 3, verify_us=10**9))).verify_us == 0xFFFF * 100


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_rejected(msg):
    payload = wire.encode(msg)
    for cut in range(len(payload)):
        with pytest.raises(wire.WireError):
            wire.decode(payload[:cut])


def test_trailing_bytes_are_rejected():
    with pytest.raises(wire.WireError, match="trailing"):
        wire.decode(wire.encode(wire.Close(1, 1)) + b"\0")


def test_newer_protocol_version_is_rejected_clearly():
    payload = bytearray(wire.encode(wire.Close(1, 1)))
    payload[0] = wire.PROTOCOL_VERSION + 1
    with pytest.raises(wire.UnsupportedVersion, match=f"protocol version {wire.PROTOCOL_VERSION + 1}"):
        wire.decode(bytes(payload))


def test_unknown_type_is_rejected():
    with pytest.raises(wire.UnknownType):
        wire.decode(wire.HEADER.pack(wire.PROTOCOL_VERSION, 99, 1, 1))


def test_oversized_payloads_and_counts_are_rejected_before_allocation():
    with pytest.raises(wire.Oversized):
        wire.decode(b"\x01" * (wire.MAX_PAYLOAD + 1))
    huge_open = (wire.HEADER.pack(wire.PROTOCOL_VERSION, wire.Open.TYPE, 1, 0)
                 + wire.Open.BODY.pack(0, 0, 0, 1, 0, bytes(8), 0, bytes(8), bytes(8), 10**9))
    with pytest.raises(wire.Oversized):
        wire.decode(huge_open)
    with pytest.raises(wire.Oversized):
        wire.encode(wire.Draft(1, 1, 1, list(range(wire.MAX_DRAFT + 1))))


def test_q_that_does_not_sum_to_one_is_rejected():
    payload = bytearray(wire.encode(MESSAGES[3]))
    payload[-1] ^= 0x01  # flip a count bit
    with pytest.raises(wire.WireError, match="sum"):
        wire.decode(bytes(payload))


def test_token_outside_its_own_q_is_rejected():
    q = Q[0]
    outside = next(t for t in range(10) if t not in q.ids.tolist())
    with pytest.raises(wire.WireError, match="outside"):
        wire.encode(wire.Draft(1, 1, 1, [outside], Q))
    payload = bytearray(wire.encode(MESSAGES[3]))
    payload[wire.HEADER.size + wire.Draft.BODY.size + 1] = len(q.ids)  # the drafted token's place in q, one past its end
    with pytest.raises(wire.WireError, match="place"):
        wire.decode(bytes(payload))


def test_bad_sampling_params_in_open_are_rejected():
    payload = wire.encode(wire.Open(1, 0, [1], SamplingParams()))
    bad = (payload[:wire.HEADER.size] + wire.Open.BODY.pack(0, -1.0, 0, 1.0, 0, bytes(8), 0, bytes(8), bytes(8), 1)
           + payload[-4:])
    with pytest.raises(wire.WireError, match="temperature"):
        wire.decode(bad)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_random_payloads_never_crash_the_decoder(data):
    try:
        wire.decode(data)
    except wire.WireError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_mutated_payloads_decode_or_fail_cleanly(msg, data):
    payload = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        wire.decode(bytes(payload))
    except wire.WireError:
        pass


def test_each_message_layout_is_written_once_and_every_type_has_one_codec():
    """One Struct per body, next to its dataclass: encode and decode read the same object, so the
    two directions cannot drift apart (issue 21)."""
    import inspect
    import re

    source = inspect.getsource(wire)
    layouts = re.findall(r'struct\.Struct\("([^"]*)"\)', source)
    assert len(layouts) == len(set(layouts)), layouts
    assert not re.search(r"struct\.(pack|unpack|unpack_from|calcsize)\(", source)  # only through the Structs
    types = {m.TYPE for m in wire.MESSAGES.values()} | {wire.Draft.TYPE_FORCED}  # a DRAFT's second type
    assert set(wire.CODECS) == types and len(wire.CODECS) == 11
    for codec in wire.CODECS.values():
        assert isinstance(codec.message.BODY, struct.Struct)
