"""Structured output: a grammar constrains what the target may say, and the draft the same way.

Terms.
- A *grammar* is llguidance's grammar text (from a JSON schema or Lark; llguidance compiles it);
  its *hash* (8 bytes of BLAKE2b) names it on the wire, and the verifier caches it compiled.
- A *constraint* is one request's grammar state over its generated text. Its *mask* is the set of
  tokens the grammar allows next.
- Constrained decoding replaces the target's distribution p by p masked and renormalised (logits
  set to -inf outside the mask, then temperature, top-k and top-p as usual); the draft's q is
  masked the same way. Speculative decoding's rule (specedge/speculative.py) then stays exact with
  respect to the constrained target, greedy and sampled.
- Where the mask allows exactly one token the constrained p is a point mass: that token is
  *forced*. The device commits it with no target pass and no round trip; the verifier checks it
  against the same grammar when the next round states it.

JSON is compiled without free whitespace (", " and ": " as separators, as chat models write it),
so the keys and punctuation of a schema are forced: llguidance allows only the canonical
tokenization of bytes the grammar fixes.
"""
from __future__ import annotations

import functools
import json

import numpy as np

from specedge.protocol.wire import MAX_GRAMMAR, grammar_hash  # the wire's limit and name for a grammar

JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# Qwen's chat template wraps a tool call in these special tokens (the Hermes format); a tokenizer
# without them gets bare JSON calls.
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarError(ValueError):
    """A response_format, tools definition or grammar that cannot be compiled: the request's fault."""


def _llg():
    try:
        import llguidance
    except ImportError as exc:  # a declared dependency; this names it if an install lacks it
        raise GrammarError("structured output needs llguidance (pip install llguidance)") from exc
    return llguidance


# -- what an OpenAI-style request asks for, as grammar text ---------------------------------------
def json_schema(schema: dict) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return _llg().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
    except ValueError as exc:
        raise GrammarError(f"JSON schema: {exc}") from exc


def from_response_format(response_format) -> str | None:
    """OpenAI's response_format: {"type": "text"} (no grammar), {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}. The schema is enforced
    whether or not `strict` is set: a robot gets what it asked for."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError('response_format json_schema needs {"name": ..., "schema": {...}}')
        return json_schema(spec.get("schema") or {"type": "object"})
    raise GrammarError(f"response_format type {kind!r}: expected text, json_object or json_schema")


def tool_functions(tools) -> dict[str, dict]:
    """{name: parameters schema} of OpenAI `tools` ([{"type": "function", "function": {...}}])."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools must be a non-empty list")
    out = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError('each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise GrammarError(f"tool {fn['name']}: parameters must be a JSON schema object")
        out[fn["name"]] = params
    return out


def call_schema(functions: dict[str, dict]) -> dict:
    """One call of any of `functions`: {"name": ..., "arguments": {...}}, as Qwen writes it."""
    def one(name, params):
        return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}
    calls = [one(n, p) for n, p in functions.items()]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def from_tools(tools, tool_choice, hermes: bool) -> str | None:
    """The grammar for OpenAI `tools` under `tool_choice`: "none" (no grammar), "required" (one or
    more calls), {"type": "function", "function": {"name": N}} (one call of N) or "auto" (text, or
    calls). `hermes`: the tokenizer has Qwen's <tool_call> tokens, which frame each call; without
    them a call is bare JSON and, under "auto", text may not begin with "{"."""
    functions = tool_functions(tools)
    if tool_choice in (None, "auto"):
        choice = "auto"
    elif tool_choice in ("none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
        functions, choice = {name: functions[name]}, "required"
    else:
        raise GrammarError('tool_choice must be "none", "auto", "required" or {"type": "function", ...}')
    if choice == "none":
        return None
    body = json.dumps({**call_schema(functions), "x-guidance": JSON_STYLE})
    if hermes:
        call = f'{TOOL_OPEN} "\\n" body "\\n" {TOOL_CLOSE}'
        text = r"/(?s:.+)/"  # special tokens never match text: a <tool_call> is always a whole call
    else:
        call = "body"
        text = r"/[^{](?s:.)*/"
    start = "calls" if choice == "required" else "TEXT | calls"
    lark = f'start: {start}\ncalls: call ("\\n" call)*\ncall: {call}\nbody: %json {body}\nTEXT: {text}\n'
    return _llg().LLMatcher.grammar_from_lark(lark)


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in a tools grammar's output ({"name", "arguments"} each), or None for plain text.
    The special tokens that frame Hermes calls are gone from decoded text: calls are the lines
    that are whole JSON objects."""
    calls = []
    for line in filter(None, (line.strip() for line in text.split("\n"))):
        try:
            call = json.loads(line)
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return None
        calls.append(call)
    return calls or None


# -- compiled grammars and their state ---------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of our tokenizer (about 1 s for Qwen's vocabulary): built once."""
    return _llg().LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)


class Compiled:
    """A grammar checked for one tokenizer and vocabulary; start() gives a request its state.

    Each request gets a matcher of its own (under a millisecond for a JSON schema), never a deep
    copy of one: copies share llguidance's lexer and the budget ("fuel") it spends building
    derivatives, so one request that spent it (a long string under a large repetition bound) left
    every other request of the grammar in the error state, allowing only EOS."""

    def __init__(self, tokenizer, vocab_size: int, text: str, limits: dict | None = None):
        """`limits`: llguidance's parser limits (LLParserLimits' keywords; default: its own)."""
        if len(text.encode()) > MAX_GRAMMAR:
            raise GrammarError(f"grammar of {len(text.encode())} bytes exceeds the limit of {MAX_GRAMMAR}")
        self.text, self.hash, self.vocab_size, self.limits = text, grammar_hash(text), vocab_size, limits
        self._tokenizer = _ll_tokenizer(tokenizer, vocab_size)
        matcher = self._matcher()
        if matcher.is_error():
            raise GrammarError(f"grammar does not compile: {matcher.get_error()}")

    def _matcher(self):
        llg = _llg()
        limits = llg.LLParserLimits(**self.limits) if self.limits else None
        return llg.LLMatcher(self._tokenizer, self.text, log_level=0, limits=limits)

    def start(self) -> "Constraint":
        return Constraint(self._matcher(), self.vocab_size)


class Constraint:
    """One request's grammar state over its generated text (see the module docstring). A matcher
    that fails (llguidance's resource limits) raises GrammarError at once: its mask would allow
    only EOS, and an answer cut short there must never pass for the grammar's."""

    def __init__(self, matcher, vocab_size: int):
        self.m, self.vocab_size = matcher, vocab_size
        self.length = 0  # tokens consumed

    def _healthy(self) -> None:
        if self.m.is_error():
            raise GrammarError(f"the grammar's matcher failed: {self.m.get_error()}")

    def _bitmask(self) -> bytes:
        raw = self.m.compute_bitmask()
        self._healthy()
        return raw

    def _bits(self) -> int:
        return int.from_bytes(self._bitmask(), "little")

    def allowed(self) -> np.ndarray:
        """bool[vocab]: the tokens the grammar allows next."""
        raw = np.frombuffer(self._bitmask(), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little")[: self.vocab_size].astype(bool)

    def forced(self) -> int | None:
        """The one token the grammar allows next, or None (several, or none: an error state)."""
        bits = self._bits()
        return bits.bit_length() - 1 if bits and not bits & (bits - 1) else None

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the grammar allows from here (consuming none)."""
        return self.m.validate_tokens(list(tokens)) if tokens else 0

    def accept(self, tokens: list[int]) -> bool:
        """Consume `tokens` if the grammar allows every one of them; False (and nothing consumed)
        if not. A stop token ends the answer and is never consumed: callers pass what precedes it."""
        if not tokens:
            return True
        if self.valid_prefix(tokens) != len(tokens):
            self._healthy()
            return False
        self.m.consume_tokens(list(tokens))
        self._healthy()
        self.length += len(tokens)
        return True

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)
            self.length -= n

    def mask(self, logits):
        """`logits` (one row, NumPy or torch) with -inf where the grammar forbids the token."""
        allowed = self.allowed()
        if isinstance(logits, np.ndarray):
            out = np.full_like(logits, -np.inf)
            n = min(len(out), len(allowed))
            out[:n][allowed[:n]] = logits[:n][allowed[:n]]
            return out
        import torch

        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(logits.shape[-1], len(allowed))
        keep[:n] = torch.from_numpy(allowed[:n])
        return logits.masked_fill(~keep, float("-inf"))


def reference_decode(model, tokenizer, prompt: list[int], max_new: int, text: str) -> list[int]:
    """The target's own grammar-constrained greedy decoding, one position at a time, outside every
    service: argmax of the masked logits, until a stop token or `max_new`. What speculation must
    equal, token for token (tests, bench-apps)."""
    import torch

    c = Compiled(tokenizer, model.cfg.vocab_size, text).start()
    cache = model.new_cache()
    model.forward(prompt[:-1], cache, last_only=True)
    last, out = prompt[-1], []
    for _ in range(max_new):
        token = int(torch.argmax(c.mask(model.forward([last], cache)[-1])))
        if token in tokenizer.stop_ids or not c.accept([token]):
            break
        out.append(token)
        last = token
    return out


class Cache:
    """Compiled grammars by hash, each held for a *scope* (a verifier passes the session's prefix
    scope: the device, or its fleet under share_prefixes = "fleet"): an OPEN that names a grammar
    by hash alone finds it only where its own scope sent the text, so whether a verifier holds a
    schema tells a device nothing about another's. Least recently used first out: a scope holds
    at most `per_scope` grammars, all scopes together `size`, taken from the scope holding the
    most, so one device opening grammar after grammar churns only its own."""

    def __init__(self, size: int = 256, limits: dict | None = None, per_scope: int = 16):
        self.size, self.limits, self.per_scope = size, limits, per_scope
        self._compiled: dict[tuple, dict[tuple, Compiled]] = {}  # scope -> key -> grammar, oldest first

    def __len__(self) -> int:
        return sum(len(held) for held in self._compiled.values())

    def find(self, tokenizer, vocab_size: int, digest: bytes, scope: tuple = ()) -> Compiled | None:
        """The grammar named by `digest` if `scope` sent its text here (an OPEN that sent no
        text), now the most recently used."""
        held, key = self._compiled.get(scope, {}), (tokenizer, vocab_size, digest)
        hit = held.pop(key, None)
        if hit is not None:
            held[key] = hit
        return hit

    def get(self, tokenizer, vocab_size: int, text: str, scope: tuple = ()) -> Compiled:
        """The grammar of `text` for `scope`, compiled unless the scope already holds it (under
        the same hash, with the same text: 8 bytes of hash are a name, not a proof)."""
        hit = self.find(tokenizer, vocab_size, grammar_hash(text), scope)
        if hit is None or hit.text != text:
            hit = Compiled(tokenizer, vocab_size, text, self.limits)
            held = self._compiled.setdefault(scope, {})
            held[(tokenizer, vocab_size, hit.hash)] = hit
            while len(held) > self.per_scope:
                held.pop(next(iter(held)))
            while len(self) > self.size:
                fullest = max(self._compiled.values(), key=len)
                fullest.pop(next(iter(fullest)))
            self._compiled = {s: h for s, h in self._compiled.items() if h}
        return hit
