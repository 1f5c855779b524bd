#!/usr/bin/env python3
"""A voice assistant on the device: a conversation whose answers are streamed from specedge's
local API and spoken sentence by sentence as the tokens arrive (espeak-ng), so speech starts
long before the answer is complete. Without espeak-ng the sentences are printed as they would be
spoken. Each question is a turn of one conversation: the history goes with it, and the device
sends the verifier only the new turn (its session is kept: `cached_tokens` in each report).

    specedge demo --serve            # or: specedge device serve --config firmware_config/device.toml
    python examples/voice_assistant.py "What is a mutex?" "And a semaphore?"
    python examples/voice_assistant.py --turns 5 < questions.txt    # remember the last 5 turns

Any OpenAI client works the same way (base_url="http://127.0.0.1:8080/v1"); this one uses only
the standard library so it runs on a bare device image.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n+")
SYSTEM = "You are a voice assistant. Answer in two or three short spoken sentences, no code, no lists."


def stream_chat(base_url: str, messages: list[dict], max_tokens: int, timeout_s: float, numbers: dict):
    """Text increments of one streamed chat completion (server-sent events); `numbers` gets the
    last event's specedge object."""
    body = json.dumps({"model": "specedge", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "system", "content": SYSTEM}, *messages]}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            numbers.update(event.get("specedge", {}))
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


class Speaker:
    """espeak-ng, one process per sentence (queued by the OS pipe), or print when it is missing."""

    def __init__(self, engine: str):
        self.exe = shutil.which("espeak-ng") if engine in ("auto", "espeak-ng") else None
        if engine == "espeak-ng" and self.exe is None:
            sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
        self.spoken = []

    def say(self, sentence: str) -> None:
        sentence = sentence.strip()
        if not sentence:
            return
        self.spoken.append(sentence)
        if self.exe:
            subprocess.run([self.exe, "--stdin"], input=sentence.encode(), check=False)
        else:
            print(f"[speak] {sentence}", flush=True)


def answer(base_url: str, history: list[dict], question: str, speaker: Speaker, max_tokens: int,
           timeout_s: float) -> dict:
    """Ask `question` after `history` (earlier turns, which it then joins) and speak the answer."""
    start, first_token_s, first_speech_s, pending, said, numbers = time.perf_counter(), None, None, "", "", {}
    asked = history + [{"role": "user", "content": question}]
    for text in stream_chat(base_url, asked, max_tokens, timeout_s, numbers):
        first_token_s = first_token_s or time.perf_counter() - start
        pending += text
        said += text
        *sentences, pending = SENTENCE_END.split(pending)  # speak each sentence as soon as it ends
        for sentence in sentences:
            first_speech_s = first_speech_s or time.perf_counter() - start
            speaker.say(sentence)
    if pending.strip():
        first_speech_s = first_speech_s or time.perf_counter() - start
        speaker.say(pending)
    history += [asked[-1], {"role": "assistant", "content": said}]
    return {"question": question, "turn": len(history) // 2, "first_token_s": first_token_s,
            "first_speech_s": first_speech_s, "total_s": time.perf_counter() - start,
            "sentences": len(speaker.spoken), "cached_tokens": numbers.get("cached_prompt_tokens", 0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="*", help="questions (default: one per stdin line)")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--tts", default="auto", choices=["auto", "espeak-ng", "print"])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--turns", type=int, default=8, help="earlier turns the conversation remembers (0: none)")
    args = p.parse_args()
    speaker = Speaker(args.tts)
    failed, history = 0, []
    for question in args.question or (line.strip() for line in sys.stdin):
        if not question:
            continue
        speaker.spoken = []
        del history[: max(0, len(history) - 2 * args.turns)]
        try:
            report = answer(args.base_url, history, question, speaker, args.max_tokens, args.timeout_s)
        except (OSError, RuntimeError) as exc:  # urllib's HTTPError and URLError are OSErrors
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(report), file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
