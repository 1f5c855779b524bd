"""Tokenizer and chat template, built from GGUF metadata with HF `tokenizers`."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Qwen2's pre-tokenizer split (tokenizer.ggml.pre = "qwen2").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, hf: HFTokenizer, eos_id: int, bos_id: int, chat_template: str):
        self.hf, self.eos_id, self.bos_id, self.chat_template = hf, eos_id, bos_id, chat_template
        self._added = frozenset(hf.get_added_tokens_decoder())  # special tokens' ids (token_bytes)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        # Chat models end a turn with <|im_end|> (eos) but may also emit <|endoftext|>.
        self.stop_ids = frozenset(i for i in (eos_id, bos_id, hf.token_to_id("<|endoftext|>"),
                                              hf.token_to_id("<|im_end|>")) if i is not None and i >= 0)

    @classmethod
    def from_gguf_fields(cls, tokens, merges, token_types, eos_id, bos_id, chat_template) -> "Tokenizer":
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
        hf = HFTokenizer(bpe)
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        from tokenizers import AddedToken

        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(token_types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)]
        hf.add_special_tokens(specials)
        return cls(hf, eos_id, bos_id, chat_template)

    @classmethod
    def from_file(cls, tokenizer_json: Path, config_json: Path) -> "Tokenizer":
        hf = HFTokenizer.from_file(str(tokenizer_json))
        cfg = json.loads(Path(config_json).read_text()) if Path(config_json).exists() else {}

        def token_id(key: str) -> int:
            if f"{key}_id" in cfg:
                return int(cfg[f"{key}_id"])
            tok = cfg.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            i = hf.token_to_id(tok) if tok else None
            return -1 if i is None else i

        eos = token_id("eos")
        if eos < 0:
            eos = hf.token_to_id("<|im_end|>") or hf.token_to_id("<|endoftext|>") or 0
        return cls(hf, eos, token_id("bos"), cfg.get("chat_template") or "")

    def save(self, tokenizer_json: Path, config_json: Path) -> None:
        self.hf.save(str(tokenizer_json))
        Path(config_json).write_text(json.dumps(
            {"eos_id": self.eos_id, "bos_id": self.bos_id, "chat_template": self.chat_template}))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): byte-level BPE pieces mapped
        back through GPT-2's byte alphabet, a special token's text as it is."""
        piece = self.hf.id_to_token(token) or ""
        if token in self._added:
            return piece.encode("utf-8")
        table = _unicode_to_byte()
        return bytes(table[c] for c in piece if c in table)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of `messages`. `tools`: OpenAI's tool definitions, which a template that
        knows them (Qwen's) shows the model; assistant messages may carry `tool_calls` and "tool"
        messages the results, in the shapes HF chat templates read."""
        if not self.chat_template:
            return "".join(m.get("content") or "" for m in messages)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None)

    def encode_chat(self, prompt: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode(self.apply_chat_template(messages))

    def fingerprint(self) -> str:
        """Hash of vocabulary and merges: drafts and targets must agree on it."""
        import hashlib

        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """`tojson` as HF transformers renders chat templates (keys in their order, no HTML escaping),
    not Jinja's own (sorted keys, "<" escaped): the text the models were trained on."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


class StreamDecoder:
    """Turns a growing list of token ids into text increments without splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, ids) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
