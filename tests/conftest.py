"""Shared fixtures: a real Mosquitto on a free port and tiny Qwen2 models written to GGUF."""
from __future__ import annotations

import pytest

from specedge.broker import MosquittoBroker
from specedge.loader import load_model
from specedge.tiny import write_pair


@pytest.fixture(scope="session")
def mosquitto():
    if MosquittoBroker.binary() is None:
        pytest.fail("mosquitto is not installed: `make test` installs it (apt-get install mosquitto)")
    broker = MosquittoBroker().start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("tiny"), seed=0, noise=0.15)


@pytest.fixture(scope="session")
def tiny_models(tiny_files):
    """(draft, tokenizer, target, tokenizer), loaded through the real GGUF loader."""
    draft_path, target_path = tiny_files
    draft, draft_tok = load_model(draft_path, dtype="bf16")
    target, target_tok = load_model(target_path, dtype="bf16", batch_invariant=True)
    return draft, draft_tok, target, target_tok


@pytest.fixture(scope="session")
def stack(tiny_models, mosquitto):
    from specedge.demo import Stack

    from specedge.config import CloudConfig, build

    # Its own fleet only: other tests' verifiers and replica groups share this broker.
    s = Stack(*tiny_models, port=mosquitto.port, cloud_cfg=build(CloudConfig, {"verifier": {"fleet": "default"}}))
    yield s
    s.close()


def reference_greedy(model, prompt: list[int], max_new: int, stop_ids) -> list[int]:
    """The target's own greedy decoding, one position at a time, outside every service."""
    import torch

    cache = model.new_cache()
    model.forward(prompt[:-1], cache, last_only=True)
    last, out = prompt[-1], []
    for _ in range(max_new):
        token = int(torch.argmax(model.forward([last], cache)[-1]))
        if token in stop_ids:
            break
        out.append(token)
        last = token
    return out
