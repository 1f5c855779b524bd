"""What a verifier can serve: the engine a target runs on, and the versions a registry file lists.

An engine is chosen ("auto": llama.cpp for a GGUF where it is installed, else torch) and opened
here. A version is a name, a model file (pinned by sha256), how it is loaded (weights, layers
dropped) and the compatibility contract of its tokenizer; load_target turns one into a Target,
self-tested. Which loaded version serves which device is cloud/versions.py's question.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from specedge.cloud.engine import Capabilities
from specedge.config import DEVICES, TARGET_ENGINES as ENGINES, WEIGHTS, ConfigError, model_label, read_toml
from specedge.protocol.contract import Contract

SHIPPED_REGISTRY = Path(__file__).with_name("targets.toml")


# -- choosing and opening an engine ---------------------------------------------------------------
MODULES = {"llama.cpp": "llama_cpp", "vllm": "vllm"}  # the optional extras an engine needs


def installed(engine: str) -> bool:
    """Whether `engine`'s package imports here (torch always does)."""
    import importlib

    try:
        importlib.import_module(MODULES[engine]) if engine in MODULES else None
    except Exception:  # an ImportError, or a shared library that does not load here
        return False
    return True


def resolve_engine(engine: str, model_path) -> str:
    """"auto": llama.cpp where it is installed and the target is a GGUF file, else torch.

    Measured on a 2-core AVX-512 BF16 EPYC (docs/engines.md): the 1.5B target decodes at
    35 ms/token on llama.cpp and 343 ms/token on torch bf16 with 16-row products. Fed one row
    per call, llama.cpp passes the same bitwise self-test as the reference, so the default costs
    no exactness: where the self-test fails, every answer says so."""
    if engine != "auto":
        return engine
    return "llama.cpp" if str(model_path).endswith(".gguf") and installed("llama.cpp") else "torch"


def weights_held(engine: str, weights: str, device: str = "cpu") -> str:
    """What an engine computes with: torch the dtype `weights` resolves to on `device`, llama.cpp
    the file's own quantised blocks, vLLM the bf16 form dequantised from them."""
    from specedge.loader import resolve_weights

    return {"torch": resolve_weights(weights, device), "llama.cpp": "gguf", "vllm": "bf16",
            "emulated": "emulated"}[engine]


def open_engine(engine: str, path, sha256: str | None, weights: str, batch_invariant: bool,
                threads: int | None = None, device: str = "cpu"):
    """(engine, tokenizer) for a resolved engine name; `weights` and `device` apply to torch only
    (llama.cpp runs the file's own quantisation and offloads by its build, vLLM the bf16
    dequantised form on its GPU), `threads` to llama.cpp (torch uses torch's setting, vLLM its own
    binding)."""
    if engine == "llama.cpp":
        from specedge.cloud.llama_target import LlamaCppTarget
        from specedge.loader import read_gguf_tokenizer

        return LlamaCppTarget(path, batch_invariant, threads=threads), read_gguf_tokenizer(path)
    if engine == "vllm":
        from specedge.cloud.vllm_target import VllmTarget
        from specedge.loader import read_tokenizer

        return VllmTarget(path, batch_invariant, sha256=sha256), read_tokenizer(path)
    if engine == "torch":
        from specedge.loader import load_model

        return load_model(path, sha256, weights, batch_invariant, device)
    if engine == "emulated":
        from specedge.cloud.emulated_target import EmulatedTarget
        from specedge.loader import read_gguf_tokenizer

        model = EmulatedTarget.load(path)
        return model, read_gguf_tokenizer(model.tokenizer_path)
    raise ValueError(f"unknown target engine {engine!r} ({', '.join(ENGINES)})")


# -- versions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    name: str
    model: str  # registry name or path
    weights: str = "auto"
    drop_layers: tuple[int, ...] = ()  # a layer-pruned variant of `model` (see prune-layers)
    sha256: str = ""  # of the model file; checked on load when given
    engine: str = "auto"  # cloud/engine.py: torch (bitwise reference) or llama.cpp
    device: str = "auto"  # torch's: cpu | cuda | auto (loader.resolve_device)

    def recipe(self) -> dict:
        """How it is loaded: another device computes other bits, so it is part of the version."""
        return {"model": self.model, "engine": self.engine, "weights": self.weights,
                "drop_layers": list(self.drop_layers), "device": self.device}


@dataclass
class Target:
    """A loaded version."""

    spec: TargetSpec
    model: object  # a target engine (cloud/engine.py): specedge.model.Qwen2 or LlamaCppTarget
    tokenizer: object
    file_sha256: str = ""
    exit_head: object = None

    @classmethod
    def in_memory(cls, name: str, model, tokenizer) -> "Target":
        """A model already loaded (the demo, tests): a version without a file behind it."""
        return cls(TargetSpec(name, "<in memory>"), model, tokenizer)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def contract(self) -> Contract:
        """Computed once per version: it fingerprints the whole tokenizer and renders the chat
        template (0.3 s), which every OPEN compares against (it was 0.3 s of every first token)."""
        return Contract.of(self.tokenizer, self.model.cfg.vocab_size)

    @property
    def version_hash(self) -> str:
        """What exactly verifies: the file and how it is loaded."""
        text = json.dumps({"file": self.file_sha256, **self.spec.recipe()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def exact(self) -> bool:
        """Passed the bitwise self-test on this machine (False until the verifier has run it)."""
        return bool(self.model.exactness and self.model.exactness.exact)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities.of(self.model)

    def describe(self) -> dict:
        return {"name": self.name, "file_sha256": self.file_sha256, "version_hash": self.version_hash,
                "layers": self.model.cfg.n_layers, "contract": self.contract.to_json(), **self.spec.recipe(),
                "exactness": self.model.exactness.describe() if self.model.exactness else None,
                "capabilities": self.capabilities.to_json() if self.model.exactness else None}


def load_target(spec: TargetSpec, batch_invariant: bool = True) -> Target:
    from specedge.fetch import resolve, sha256_file
    from specedge.loader import resolve_device

    path, sha256 = resolve(spec.model)
    if spec.sha256 and path.is_file():
        actual = sha256 if sha256 else sha256_file(path)
        if actual != spec.sha256:
            raise ConfigError(f"target {spec.name}: {path} has sha256 {actual}, the registry pins {spec.sha256}")
        sha256 = actual
    elif sha256 is None and path.is_file():
        sha256 = sha256_file(path)
    # What verifies is what this machine loads: "auto" is recorded as the engine and dtype it chose.
    engine = resolve_engine(spec.engine, path)
    if engine != "torch" and spec.drop_layers:
        raise ConfigError(f"target {spec.name}: drop_layers needs engine = \"torch\" ({engine} loads the file whole)")
    try:
        device = resolve_device(spec.device) if engine == "torch" else "auto"  # the others place themselves
    except ValueError as exc:
        raise ConfigError(f"target {spec.name}: {exc}") from None
    spec = replace(spec, engine=engine, weights=weights_held(engine, spec.weights, device), device=device)
    model, tokenizer = open_engine(engine, path, sha256, spec.weights, batch_invariant, device=device)
    if spec.drop_layers:
        model = model.layer_subset([i for i in range(model.cfg.n_layers) if i not in spec.drop_layers])
    return Target(spec, model, tokenizer, sha256 or "")


def read_registry(path: str | Path, default_engine: str = "auto", default_device: str = "auto") -> dict[str, TargetSpec]:
    data = read_toml(path, "target registry")
    versions = data.get("versions")
    if not isinstance(versions, dict) or not versions or set(data) != {"versions"}:
        raise ConfigError(f"{path}: expected only [versions.NAME] tables")
    specs = {}
    for name, entry in versions.items():
        where = f"{path}: versions.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise ConfigError(f"{where}: needs model = \"name or path\"")
        unknown = set(entry) - {"model", "engine", "weights", "drop_layers", "sha256", "device"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        drop = entry.get("drop_layers", [])
        if not isinstance(drop, list) or not all(isinstance(i, int) and i >= 0 for i in drop):
            raise ConfigError(f"{where}: drop_layers must be a list of layer indices")
        weights = entry.get("weights", "auto")
        if weights not in WEIGHTS:
            raise ConfigError(f"{where}: weights must be one of {', '.join(WEIGHTS)}")
        engine = entry.get("engine", default_engine)
        if engine not in ENGINES:
            raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}")
        device = entry.get("device", default_device)
        if device not in DEVICES:
            raise ConfigError(f"{where}: device must be one of {', '.join(DEVICES)}")
        model = entry["model"]
        if not Path(model).is_absolute() and ("/" in model or model.endswith(".gguf")):
            model = str((Path(path).parent / model).resolve())  # relative to the registry file
        specs[name] = TargetSpec(name, model, weights, tuple(sorted(set(drop))), str(entry.get("sha256", "")), engine,
                                 device)
    return specs


def registry_for(target_cfg) -> tuple[dict[str, TargetSpec], str]:
    """(versions, default version) from the [target] section: its registry file, or the one model it names."""
    if target_cfg.registry:
        path = SHIPPED_REGISTRY if target_cfg.registry == "shipped" else target_cfg.registry
        specs = read_registry(path, target_cfg.engine, target_cfg.device)
        default = target_cfg.version or next(iter(specs))
        if default not in specs:
            raise ConfigError(f"target.version {default!r} is not in {path} ({', '.join(specs)})")
        return specs, default
    name = target_cfg.version or model_label(target_cfg.model)
    return {name: TargetSpec(name, target_cfg.model, target_cfg.weights, engine=target_cfg.engine,
                             device=target_cfg.device)}, name


