"""TOML configuration for both services: small dataclasses, validated on load.

Any key can be overridden from the environment as SPECEDGE_<SECTION>_<KEY>,
e.g. SPECEDGE_MQTT_PORT=1884. Unknown sections or keys, wrong types and
out-of-range values are errors that name the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from specedge.protocol.wire import MAX_DRAFT


class ConfigError(ValueError):
    pass


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "auto"  # auto (MQTT 5, falling back to 3.1.1) | 5 | 3.1.1
    keepalive_s: int = 30
    qos: int = 1
    username: str = ""
    password: str = ""
    # TLS (docs/fleet.md): the CA that signed the broker's certificate, and this client's own
    # certificate and key (`specedge certs`); "" = plain TCP.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def validate(self):
        _check(self.protocol in ("auto", "5", "3.1.1"), "mqtt.protocol", "auto, 5 or 3.1.1")
        _check(bool(self.tls_cert) == bool(self.tls_key), "mqtt.tls_cert/tls_key", "both set or both empty")
        _check(not self.tls_cert or bool(self.tls_ca), "mqtt.tls_ca", "set whenever a client certificate is")
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            _check(not path or Path(path).is_file(), f"mqtt.{key}", f"a readable file ({path} does not exist)")
        _check(0 < self.port < 65536, "mqtt.port", "1..65535")
        _check(self.qos in (0, 1), "mqtt.qos", "0 or 1")
        _check(self.keepalive_s >= 5, "mqtt.keepalive_s", ">= 5")


@dataclass
class IdentityConfig:
    id: str = "device0"
    fleet: str = "default"

    def validate(self):
        for key in ("id", "fleet"):
            value = getattr(self, key)
            _check(bool(value) and not set(value) & set("/+#\0"), f"device.{key}",
                   "a non-empty name without / + # or NUL")
        # specedge/v1/_verifiers/... belongs to the verifier replicas.
        _check(not self.fleet.startswith("_"), "device.fleet", "a name not starting with _")


@dataclass
class DraftConfig:
    model: str = "qwen2.5-coder-0.5b"  # registry name or a path (GGUF file or HF folder)
    weights: str = "int8"  # int8 (fastest single-token decode on CPU; bf16 on a GPU) | bf16 | fp32
    device: str = "auto"  # the torch backend's: auto (a CUDA GPU where torch sees one; a Jetson's) | cpu | cuda
    q_top_k: int = 8  # sampled mode: candidates in the sparse q sent per drafted token
    q_top_p: float = 0.98  # the fewest candidates reaching this mass: ~1.6 a token on code, not ~4.7
    # A shallower draft on the same backbone: only the first `layers` layers (0 = all), read out
    # through a trained head (`specedge cloud train-exit-head --target <draft> --layer N`).
    layers: int = 0
    head: str = ""
    name: str = ""  # how the verifier's per-(draft, target) statistics name it; "" = model[-lN]
    # auto (tensorrt, then llama.cpp, then onnxruntime, then torch: the best available)
    # | tensorrt | llama.cpp | onnxruntime | torch | emulated (model: an emulation file, never
    # picked by auto; docs/capacity.md)
    backend: str = "auto"
    # Where drafts come from: model (the draft model) | lookup (prompt lookup, device/lookup.py:
    # the tokens that followed an earlier occurrence of the text's ending; no model pass)
    # | lookup,model (the lookup's proposal where there is one, the model otherwise)
    sources: str = "model"

    def validate(self):
        _check(self.backend in ("auto", "tensorrt", "llama.cpp", "onnxruntime", "torch", "emulated"), "draft.backend",
               "auto, tensorrt, llama.cpp, onnxruntime, torch or emulated")
        _check(self.source_list() in (["model"], ["lookup"], ["lookup", "model"]), "draft.sources",
               "model, lookup or lookup,model")
        _check(self.weights in ("int8", "bf16", "fp32", "fp64"), "draft.weights", "int8, bf16, fp32 or fp64")
        _check(self.device in DEVICES, "draft.device", ", ".join(DEVICES))
        _check(self.layers >= 0, "draft.layers", ">= 0 (0 = every layer)")
        _check(not self.head or self.layers > 0, "draft.head", "a file only together with draft.layers")
        _check(len(self.name.encode()) <= 64, "draft.name", "at most 64 bytes")

        _check(1 <= self.q_top_k <= 255, "draft.q_top_k", "1..255")
        _check(0 < self.q_top_p <= 1, "draft.q_top_p", "(0, 1]")

    def source_list(self) -> list[str]:
        return [s.strip() for s in self.sources.split(",") if s.strip()]

    def display_name(self) -> str:
        return self.name or (model_label(self.model) + (f"-l{self.layers}" if self.layers else ""))


@dataclass
class SpeculationConfig:
    policy: str = "adaptive"  # adaptive[:budget=J] | adaptive-energy[:floor=R] | fixed:G | cloud-ar
    max_draft: int = 64  # the wire's limit: the scheduler stops where one more token stops paying
    # Keep the last request's session open on the verifier, and the draft's cache, for the next
    # request that repeats its text (a conversation's next turn: docs/apps.md); false: every
    # request opens afresh and both sides prefill its whole prompt.
    keep_session: bool = True

    # The shape only: which policies, options and counts exist is the device's to say
    # (device/checks.py, at start-up, as parse_policy words it).
    def validate(self):
        _check(policy_shape(self.policy), "speculation.policy",
               "NAME, NAME:COUNT or NAME:KEY=VALUE[,KEY=VALUE...], each optionally +MODIFIER")
        _check(0 <= self.max_draft <= MAX_DRAFT, "speculation.max_draft", f"0..{MAX_DRAFT}")


def policy_shape(spec: str) -> bool:
    """Whether `spec` has a policy's shape, NAME[:ARGUMENT][+MODIFIER...], its argument a count or
    KEY=VALUE pairs; the names and what they accept are checked by the device (device/policy.py)."""
    argument = spec.split("+")[0].partition(":")[2]
    items = [item for item in argument.split(",") if item]
    return argument.isdigit() or all(re.fullmatch(r"[A-Za-z_][\w-]*=.*", item) for item in items)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # Sampled answers with a seed >= 0 are reproducible (coupled sampling, docs/apps.md); -1: none,
    # each answer drawn afresh. A request's own `seed` overrides it.
    seed: int = -1
    system_prompt: str = ""

    @property
    def seed_or_none(self) -> int | None:
        return self.seed if self.seed >= 0 else None

    def validate(self):
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", ">= 1")
        _check(self.temperature >= 0, "generation.temperature", ">= 0")
        _check(self.top_k >= 0, "generation.top_k", ">= 0")
        _check(0 < self.top_p <= 1, "generation.top_p", "(0, 1]")
        _check(-1 <= self.seed < 1 << 64, "generation.seed", "-1 (none) or 0..2^64-1")


FAULT_POLICIES = ("wait", "draft", "fail")


@dataclass
class FaultConfig:
    """What a request does when its verdicts stop coming (docs/faults.md)."""

    # Resend a round with no verdict after this long (backoff with jitter); the wait stretches with
    # the verifier's observed round trips, up to 8x this or max_wait_s.
    round_timeout_s: float = 30.0
    max_retries: int = 4  # resends before the verifier counts as lost and `on_verifier_loss` applies
    # wait: keep resending until `max_wait_s`; draft: go on with the draft alone for at most
    # `unverified_max_tokens` tokens, marked unverified (not lossless!); fail: fail the request now.
    on_verifier_loss: str = "wait"
    on_broker_loss: str = "wait"  # the broker connection dropped: the same three choices
    max_wait_s: float = 300.0  # a request waits at most this long for one verdict, then fails
    unverified_max_tokens: int = 32  # `draft`: the most tokens a request may add without the target

    def validate(self):
        _check(self.round_timeout_s > 0, "faults.round_timeout_s", "> 0")
        _check(self.max_retries >= 0, "faults.max_retries", ">= 0")
        _check(self.on_verifier_loss in FAULT_POLICIES, "faults.on_verifier_loss", " | ".join(FAULT_POLICIES))
        _check(self.on_broker_loss in FAULT_POLICIES, "faults.on_broker_loss", " | ".join(FAULT_POLICIES))
        _check(self.max_wait_s > 0, "faults.max_wait_s", "> 0")
        _check(self.unverified_max_tokens >= 0, "faults.unverified_max_tokens", ">= 0")


@dataclass
class EnergyConfig:
    profile: str = "orin-nano-15w"  # a [profile.*] of the profile table
    link: str = "lte"  # the radio model: a [radio.*] of the profile table (wifi, lte, 3g, 5g, none)
    meter: str = "auto"  # auto | jtop | ina3221 | rapl | estimated
    mode: str = "throughput"  # adaptive policies: throughput (under the budget) | energy (above the floor)
    budget_j_per_token: float = 0.0  # 0 = no budget
    min_tokens_per_s: float = 0.0  # 0 = no floor
    profiles: str = ""  # the profile table; "" = firmware_config/profiles.toml

    # Ranges only: the meter, the mode, the profile and its link are checked by the device
    # (device/checks.py, at start-up), and the scheduler's objective is device/scheduler.objective.
    def validate(self):
        _check(self.budget_j_per_token >= 0, "energy.budget_j_per_token", ">= 0 (0 = none)")
        _check(self.min_tokens_per_s >= 0, "energy.min_tokens_per_s", ">= 0 (0 = none)")


COMMANDS = ("set_budget", "set_policy", "drain", "resume", "reload_config", "report")


@dataclass
class ApiConfig:
    """The local API for apps on the device (docs/fleet.md)."""

    # OpenAI-compatible HTTP (and /metrics for Prometheus) on this address; port 0 = any free
    # port, -1 = off. Keep it on loopback: any local process and any web page the device's
    # browser opens can reach it (docs/security.md).
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    queue_size: int = 8  # requests waiting beyond the one running; more get 429
    max_body_kb: int = 256  # larger request bodies get 413
    timeout_s: float = 30.0  # an idle keep-alive connection or a stalled request is closed after this
    max_connections: int = 32  # open connections at once; more are answered 503 and closed
    # Browser origins (scheme://host[:port], comma-separated) whose pages may call the API
    # besides its own; any other Origin gets 403.
    allowed_origins: str = ""
    # A file holding the API key apps send as `Authorization: Bearer <key>`; "" = no key.
    # Read once at start; /health stays open.
    api_key_file: str = ""
    # The chat page at / (docs/apps.md): static files that hold nothing, served without the key
    # as /health is; the API calls it makes need the key like any app's.
    web_page: bool = True
    # The MQTT topic API (specedge/local/{device}/...) on a broker local to the device; "" = off.
    local_mqtt_host: str = ""
    local_mqtt_port: int = 1883

    def validate(self):
        _check(-1 <= self.http_port < 65536, "api.http_port", "-1 (off), 0 (any free port) or 1..65535")
        _check(0 <= self.queue_size <= 4096, "api.queue_size", "0..4096")
        _check(1 <= self.max_body_kb <= 65536, "api.max_body_kb", "1..65536")
        _check(0.1 <= self.timeout_s <= 3600, "api.timeout_s", "0.1..3600")
        _check(1 <= self.max_connections <= 4096, "api.max_connections", "1..4096")
        _check(all(re.fullmatch(r"https?://[^/?#\s]+", o) for o in self.origins()), "api.allowed_origins",
               "comma-separated origins as browsers send them: scheme://host[:port], no path")
        _check(not self.api_key_file or Path(self.api_key_file).is_file(), "api.api_key_file",
               f"\"\" or a readable file ({self.api_key_file} does not exist)")
        _check(0 < self.local_mqtt_port < 65536, "api.local_mqtt_port", "1..65535")

    def origins(self) -> set[str]:
        return {o.strip().lower() for o in self.allowed_origins.split(",") if o.strip()}


@dataclass
class FleetConfig:
    """Fleet topics (docs/fleet.md): telemetry, commands, desired config."""

    telemetry_interval_s: float = 10.0
    # Commands operators may send this device (a comma-separated subset of: set_budget,
    # set_policy, drain, resume, reload_config, report); others are refused as unauthorised.
    allowed_commands: str = ",".join(COMMANDS)
    remote_config: bool = True  # apply the retained desired config the fleet publishes

    def validate(self):
        _check(self.telemetry_interval_s >= 0.1, "fleet.telemetry_interval_s", ">= 0.1")
        unknown = set(self.allowed()) - set(COMMANDS)
        _check(not unknown, "fleet.allowed_commands", "a comma-separated subset of " + ", ".join(COMMANDS))

    def allowed(self) -> list[str]:
        return [c.strip() for c in self.allowed_commands.split(",") if c.strip()]


@dataclass
class DeviceConfig:
    device: IdentityConfig = field(default_factory=IdentityConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


@dataclass
class VerifierIdentity:
    id: str = "verifier0"
    fleet: str = "+"  # serve every fleet, or one fleet's devices
    session_idle_s: float = 600.0
    # Replicas with the same group share new sessions (MQTT 5 shared subscription); "" = plain.
    group: str = "verifiers"
    # Batching: a draft waits at most batch_window_ms, or batch_wait_fraction of the last pass's
    # compute time if longer, for others to join its target pass, which holds at most max_batch
    # sessions (1 = no batching). The fraction lets the devices just answered (a draft and a round
    # trip away) join the next pass when passes are slow, instead of splitting into two half
    # batches that take turns.
    max_batch: int = 16
    batch_window_ms: float = 5.0
    batch_wait_fraction: float = 0.25
    # KV caches of all sessions together; beyond it the least recently used are dropped (their
    # committed text stays, the next round rebuilds the cache).
    kv_budget_mb: float = 4096.0
    # What one device may hold (docs/verifier.md, "Limits"): an OPEN beyond the session count
    # drops that device's least recently used session; a context beyond the token count is
    # refused with OVERLOADED. A cold session's committed text is fed at most prefill_chunk
    # positions per pass, so a long prompt does not hold every other device's round back.
    max_sessions_per_device: int = 4
    max_context_per_device: int = 32768
    prefill_chunk: int = 512
    # What one target pass feeds at most, in all and for one device's rounds (beyond its first):
    # a pass's length is every round's wait in it. The rest go in the next passes.
    max_pass_rows: int = 1024
    max_device_rows: int = 256
    # Whose cached prompt prefix a new session may start from (docs/security.md): "device", the
    # same device's sessions only; "fleet", any device of its fleet (a shared system prompt is
    # prefilled once, and a device can tell by the time to first token whether another device of
    # the fleet sent a prompt). Never across fleets.
    share_prefixes: str = "device"
    # Each device's share of the target (cloud/fairness.py): while a device within its share has
    # a round pending, the rounds of devices over share_slack times their share wait, and their
    # passes alone are kept to about yield_ms; one that cannot be (a slow target) waits for the
    # lighter devices to go idle, at most share_hold_s. share_slack 0: off.
    share_slack: float = 1.2
    yield_ms: float = 50.0
    share_hold_s: float = 10.0
    stats_interval_s: float = 5.0  # statistics on specedge/v1/_verifiers/{id}/stats
    metrics_port: int = -1  # Prometheus /metrics on this port (0 = any free port, -1 = off)
    metrics_host: str = "127.0.0.1"

    def validate(self):
        _check(TOPIC_NAME.fullmatch(self.id) is not None, "verifier.id", "1 to 64 of A-Z a-z 0-9 _ -")
        _check(self.fleet == "+" or not set(self.fleet) & set("/+#\0"), "verifier.fleet", "+ or a fleet name")
        _check(self.session_idle_s > 0, "verifier.session_idle_s", "> 0")
        _check(not set(self.group) & set("/+#\0"), "verifier.group", "a name without / + # NUL, or \"\"")
        _check(1 <= self.max_batch <= 256, "verifier.max_batch", "1..256")
        _check(0 <= self.batch_window_ms <= 1000, "verifier.batch_window_ms", "0..1000")
        _check(0 <= self.batch_wait_fraction <= 1, "verifier.batch_wait_fraction", "0..1")
        _check(self.kv_budget_mb > 0, "verifier.kv_budget_mb", "> 0")
        _check(self.max_sessions_per_device >= 1, "verifier.max_sessions_per_device", ">= 1")
        _check(self.max_context_per_device >= 1, "verifier.max_context_per_device", ">= 1")
        _check(self.prefill_chunk >= 1, "verifier.prefill_chunk", ">= 1")
        _check(self.max_pass_rows >= 1, "verifier.max_pass_rows", ">= 1")
        _check(self.max_device_rows >= 1, "verifier.max_device_rows", ">= 1")
        _check(self.share_prefixes in SHARE_PREFIXES, "verifier.share_prefixes", " or ".join(SHARE_PREFIXES))
        _check(self.share_slack == 0 or self.share_slack >= 1, "verifier.share_slack", "0 (off) or >= 1")
        _check(0 < self.yield_ms <= 60_000, "verifier.yield_ms", "0 < yield_ms <= 60000")
        _check(0 <= self.share_hold_s <= 3600, "verifier.share_hold_s", "0..3600")
        _check(self.stats_interval_s > 0, "verifier.stats_interval_s", "> 0")
        _check(-1 <= self.metrics_port < 65536, "verifier.metrics_port", "-1 (off), 0 (any free port) or 1..65535")


# A name that becomes a topic level (a verifier's id, which devices read as its replica's name):
# no wildcard, separator or anything else a broker or its ACL could read another way.
TOPIC_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHARE_PREFIXES = ("device", "fleet")
TARGET_ENGINES = ("auto", "torch", "llama.cpp", "vllm", "emulated")  # cloud/engine.py
WEIGHTS = ("auto", "int8", "bf16", "fp32", "fp64")  # how a model's weights are held (loader.load_model)
DEVICES = ("auto", "cpu", "cuda")  # where the torch engine computes (loader.resolve_device)


@dataclass
class TargetConfig:
    model: str = "qwen2.5-coder-1.5b"
    # cloud/engine.py: "torch" is the PyTorch reference (early-exit hints); "llama.cpp" runs the GGUF
    # as stored, ten times faster per token on a CPU; "vllm" for GPU servers (docs/engines.md);
    # "auto" = llama.cpp where installed.
    engine: str = "auto"
    weights: str = "auto"  # torch: bf16 on a GPU or where the CPU has AMX/AVX512-BF16, else fp32 (loader.resolve_weights)
    # torch: auto (a CUDA GPU where torch sees one, else the CPU) | cpu | cuda. llama.cpp offloads
    # by its build, vLLM runs on its GPU: neither reads it.
    device: str = "auto"
    # Bit-identical logits whether a position is verified in a block or decoded alone (llama.cpp:
    # one row per call); false lets llama.cpp batch rows, cheaper and numerical.
    batch_invariant: bool = True
    # Rows per weight-product call: 0 = the start-up self-test picks the cheapest block that keeps
    # the target bitwise exact here; N = use N (and only report whether it passes). A harness that
    # compares against its own decoding pins the block its reference used.
    block: int = 0
    # Early-exit hints (sent to devices that ask): the layer they are read after, 0 = three
    # quarters of the target's depth; a trained exit head (`specedge cloud train-exit-head`),
    # "" = the target's own final norm and output head.
    exit_layer: int = 0
    exit_head: str = ""
    # A hint leaves only when the exit is this sure of every guess it rests on: a wrong hint costs
    # the device its own bet, which holds more often than a doubtful hint.
    exit_threshold: float = 0.5
    # Target versions: a registry file ([versions.NAME] tables; "shipped" = cloud/targets.toml) and
    # the version served when no announcement says otherwise. Without a registry the one version
    # is `model` above, named `version` or after the model.
    registry: str = ""
    version: str = ""

    def validate(self):
        _check(self.weights in WEIGHTS, "target.weights", ", ".join(WEIGHTS))
        _check(self.device in DEVICES, "target.device", ", ".join(DEVICES))
        _check(self.engine in TARGET_ENGINES, "target.engine", ", ".join(TARGET_ENGINES))
        _check(self.exit_layer >= 0, "target.exit_layer", ">= 0 (0 = three quarters of the depth)")
        _check(0 <= self.block <= 64, "target.block", "0 (the self-test picks) or 1..64 rows")
        _check(0.0 <= self.exit_threshold <= 1.0, "target.exit_threshold", "0..1")


@dataclass
class CloudConfig:
    verifier: VerifierIdentity = field(default_factory=VerifierIdentity)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


def model_label(model: str) -> str:
    """A short name for a model setting: the registry name itself, or a file's or folder's name."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: allowed values are {allowed}")


def _coerce(value, typ, key: str):
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
    elif typ in (int, float):
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
        # TOML ints are fine for floats; floats are not fine for ints; bools are neither.
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and (typ is float or isinstance(value, int)):
            return typ(value)
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")


def build(cls, data: dict, source: str = "config", env: dict | None = None):
    """A validated `cls` (DeviceConfig or CloudConfig) from a dict and the environment."""
    env = os.environ if env is None else env
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a table")
    sections = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
    built = {}
    for name, f in sections.items():
        section_cls = f.default_factory().__class__
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        keys = {k.name: k for k in dataclasses.fields(section_cls)}
        unknown = set(values) - set(keys)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(keys)}")
        kwargs = {}
        for key, kf in keys.items():
            typ = {"int": int, "float": float, "str": str, "bool": bool}[kf.type]
            env_key = f"SPECEDGE_{name}_{key}".upper()
            if env_key in env:
                kwargs[key] = _coerce(env[env_key], typ, f"{env_key} (environment)")
            elif key in values:
                kwargs[key] = _coerce(values[key], typ, f"{source}: {name}.{key}")
        section = section_cls(**kwargs)
        try:
            section.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        built[name] = section
    return cls(**built)


def read_toml(path: str | Path, what: str = "config file") -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


# Files a config file names, read relative to that file's folder: a service starts in / (systemd),
# not where its config is.
FILE_KEYS = {"mqtt": ("tls_ca", "tls_cert", "tls_key"), "api": ("api_key_file",)}


def load(cls, path: str | Path | None):
    if path is None:
        return build(cls, {}, "defaults")
    data, folder = read_toml(path), Path(path).absolute().parent
    for section, keys in FILE_KEYS.items():
        values = data.get(section)
        for key in keys if isinstance(values, dict) else ():
            if isinstance(values.get(key), str) and values[key]:
                values[key] = str(folder / values[key])  # an absolute path stays as it is
    return build(cls, data, str(path))
