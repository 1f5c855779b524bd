"""`specedge demo`: broker, verifier and agent in one process, real models, one prompt.

Runs speculative decoding, then the cloud-only autoregressive baseline on the
same prompt, target and broker, and reports both side by side.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from specedge.broker import EmbeddedBroker, MosquittoBroker
from specedge.config import CloudConfig, DeviceConfig, build
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams
from specedge.tokenizer import StreamDecoder

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."


class Stack:
    """An agent and a verifier on one broker: what the demo, the tests and the bench build on."""

    def __init__(self, draft_model, draft_tok, target_model, target_tok, broker: str = "embedded",
                 device_cfg: DeviceConfig | None = None, cloud_cfg: CloudConfig | None = None, port: int | None = None,
                 serve: bool = False):
        """`draft_model`: a draft model (run on torch) or a draft engine of any backend.
        `serve`: the device runs as a service (DeviceNode: local HTTP API, fleet topics) around the agent."""
        from specedge.cloud.registry import Target
        from specedge.cloud.verifier import Verifier
        from specedge.device.agent import Agent
        from specedge.device.draft import DraftEngine, TorchDraftEngine

        self.broker = None
        if port is None:
            self.broker = (EmbeddedBroker() if broker == "embedded" else MosquittoBroker()).start()
            port = self.broker.port
        device_cfg = device_cfg or build(DeviceConfig, {})
        cloud_cfg = cloud_cfg or build(CloudConfig, {})
        # amqtt speaks only 3.1.1: skip the MQTT 5 attempt it would log as an error.
        protocol = "3.1.1" if isinstance(self.broker, EmbeddedBroker) else device_cfg.mqtt.protocol
        device_cfg = replace(device_cfg, mqtt=replace(device_cfg.mqtt, port=port, protocol=protocol))
        cloud_cfg = replace(cloud_cfg, mqtt=replace(cloud_cfg.mqtt, port=port, protocol=protocol))
        self.tokenizer = draft_tok
        self.verifier = Verifier(cloud_cfg, Target.in_memory(cloud_cfg.target.version or "target", target_model,
                                                             target_tok)).start()
        engine = draft_model if isinstance(draft_model, DraftEngine) else TorchDraftEngine(
            draft_model, device_cfg.draft.q_top_k, device_cfg.draft.q_top_p)
        self.node = None
        if serve:
            from specedge.device.node import DeviceNode

            self.node = DeviceNode(device_cfg, engine, draft_tok).start()
            self.agent = self.node.service.agent
        else:
            self.agent = Agent(device_cfg, engine, draft_tok).start()

    def close(self) -> None:
        if self.node is not None:
            self.node.stop()
        else:
            self.agent.stop()
        self.verifier.stop()
        if self.broker is not None:
            self.broker.stop()


def machine() -> dict:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def serve(args, draft, draft_tok, target, target_tok) -> int:
    """Broker, verifier and the device service with its local HTTP API, until Ctrl-C (examples/)."""
    import signal
    import threading

    # the draft as loaded (a path or a name): what /v1/models and every OPEN name it by
    device_cfg = build(DeviceConfig, {"api": {"http_port": args.http_port}, "fleet": {"telemetry_interval_s": 5},
                                      "generation": {"max_new_tokens": args.max_new_tokens},
                                      "draft": {"model": args.draft}})
    stack = Stack(draft, draft_tok, target, target_tok, broker=args.broker, device_cfg=device_cfg, serve=True,
                  cloud_cfg=build(CloudConfig, {"target": {"version": args.target}}))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = stack.node.http.port
        print(json.dumps({**stack.node.describe(), "mqtt_port": stack.agent.cfg.mqtt.port}), flush=True)
        print(f"chat page on http://127.0.0.1:{port}/, device API on http://127.0.0.1:{port}/v1 "
              f"(OpenAI-compatible), metrics on /metrics; fleet "
              f"`specedge fleet --port {stack.agent.cfg.mqtt.port} ls`; Ctrl-C stops", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        stack.close()
    return 0


def add_parser(sub) -> None:
    from specedge.options import model_options

    d = sub.add_parser("demo", help="broker + verifier + agent in one process on the real Qwen pair")
    d.add_argument("--prompt", default=None)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--top-k", type=int, default=0)
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--policy", default="fixed:4", help="fixed:G, adaptive[:budget=J], adaptive-energy or cloud-ar")
    model_options(d)

    d.add_argument("--broker", default="embedded", choices=["embedded", "mosquitto"])
    d.add_argument("--json", help="write the summary as JSON here")
    d.add_argument("--serve", action="store_true",
                   help="instead of one prompt: keep broker, verifier and device running, with the device's "
                        "local HTTP API (for examples/) until Ctrl-C")
    d.add_argument("--http-port", type=int, default=8080, help="--serve: the local HTTP API's port (0 = any)")
    d.set_defaults(func=run)


def run(args) -> int:
    """One prompt speculatively, then by the cloud alone, on one broker; the two side by side (and
    with --json written). Exit 1 when a greedy speculative output differs from the target's own."""
    if args.prompt is None:
        args.prompt = DEFAULT_PROMPT
    draft, draft_tok, loaded = load_models(args)
    target, target_tok = loaded.model, loaded.tokenizer
    if args.serve:
        return serve(args, draft, draft_tok, target, target_tok)
    # The cloud-only baseline runs the same prompt next: it must not go on in the session the
    # speculative run kept (its prefill would be skipped), so neither keeps one.
    stack = Stack(draft, draft_tok, target, target_tok, broker=args.broker,
                  device_cfg=build(DeviceConfig, {"speculation": {"keep_session": False}}))
    exactness = target.exactness  # the verifier self-tested the target as it started
    print(f"target engine {loaded.spec.engine}; self-test: {exactness.summary()}", file=sys.stderr, flush=True)
    try:
        spec, base, policy, greedy = generate_both(args, stack, draft_tok)
    finally:
        stack.close()
    report = summary(args, spec, base, policy, greedy, (draft, draft_tok), loaded, exactness)
    print_comparison(report, spec.stats.summary(), base.stats.summary(), policy.name, exactness)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if report["output_matches_target"] in (True, None) else 1


def load_models(args):
    """(draft engine, its tokenizer, the loaded target): the draft on its backend, the target on
    its engine, as --draft*, --target*, --engine and --batch-invariant say."""
    from specedge.cloud.registry import TargetSpec, load_target
    from specedge.config import DraftConfig
    from specedge.device.backends import open_engine

    t0 = time.perf_counter()
    print(f"loading draft {args.draft} and target {args.target} ...", file=sys.stderr, flush=True)
    draft, draft_tok = open_engine(DraftConfig(model=args.draft, weights=args.draft_weights,
                                               backend=args.draft_backend))
    loaded = load_target(TargetSpec(args.target, args.target, args.target_weights, engine=args.engine),
                         args.batch_invariant)
    print(f"models ready in {time.perf_counter() - t0:.1f}s; starting broker ({args.broker}), verifier and agent",
          file=sys.stderr, flush=True)
    return draft, draft_tok, loaded


def generate_both(args, stack: Stack, draft_tok):
    """(speculative result, cloud-only result, the policy, greedy?): the prompt under --policy,
    streamed to stdout, then under cloud-ar with the same sampling parameters."""
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompt = draft_tok.encode_chat(args.prompt)
    policy = parse_policy(args.policy)

    print(f"\n>>> {args.prompt}\n", flush=True)
    stream = StreamDecoder(draft_tok)
    spec = stack.agent.generate(prompt, params, args.max_new_tokens, policy,
                                on_tokens=lambda toks, verified: print(stream.push(toks), end="", flush=True))
    print("\n", flush=True)
    print("running the cloud-only autoregressive baseline on the same prompt ...", file=sys.stderr, flush=True)
    base = stack.agent.generate(prompt, params, args.max_new_tokens, parse_policy("cloud-ar"))
    return spec, base, policy, params.greedy


def summary(args, spec, base, policy, greedy: bool, drafter, loaded, exactness) -> dict:
    """The demo's JSON report: both runs' figures, what ran where, and whether the output is exact.
    `drafter`: (draft engine, its tokenizer)."""
    draft, draft_tok = drafter
    s, b = spec.stats.summary(), base.stats.summary()
    return {
        "prompt": args.prompt,
        "policy": policy.name,
        "draft": args.draft, "target": args.target,
        "draft_backend": draft.backend,
        "draft_weights": args.draft_weights if draft.backend != "llama.cpp" else "gguf",
        "target_engine": loaded.spec.engine, "target_weights": loaded.spec.weights,
        "exactness_class": "exact" if exactness.exact else "numerical",
        "broker": args.broker,
        "temperature": args.temperature,
        "tokens_per_s": s["tokens_per_s"],
        "acceptance_rate": s["acceptance_rate"],
        "mean_accepted_len": s["mean_accepted_len"],
        "draft_efficiency": s["draft_efficiency"],
        "target_passes_per_token": s["target_passes_per_token"],
        "wire_bytes_per_token": s["wire_bytes_per_token"],
        "ttft_s": s["ttft_s"],
        "generated_tokens": s["generated_tokens"],
        "draft_ms_per_token": s["draft_ms_per_token"],
        "verify_ms_per_pass": s["verify_ms_per_pass"],
        "baseline_tokens_per_s": b["tokens_per_s"],
        "baseline_ttft_s": b["ttft_s"],
        "baseline_wire_bytes_per_token": b["wire_bytes_per_token"],
        "speedup_vs_cloud_ar": s["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else 0.0,
        # Greedy: the speculative text must equal the target's own greedy decoding.
        "output_matches_target": (spec.tokens == base.tokens) if greedy else None,
        "exact": spec.stats.exact,  # the verifier's self-test passed: what the product promises
        "self_test": exactness.describe(),
        "text": draft_tok.decode(spec.tokens),
        "machine": machine(),
    }


def print_comparison(report: dict, s: dict, b: dict, policy_name: str, exactness) -> None:
    """The speculative run (`s`) and the cloud-only one (`b`) as a table on stdout."""
    rows = [("tokens/s", f"{s['tokens_per_s']:.2f}", f"{b['tokens_per_s']:.2f}"),
            ("time to first token (s)", f"{s['ttft_s']:.2f}", f"{b['ttft_s']:.2f}"),
            ("acceptance rate", f"{s['acceptance_rate']:.3f}", "-"),
            ("mean accepted length", f"{s['mean_accepted_len']:.2f}", "-"),
            ("target passes / token", f"{s['target_passes_per_token']:.3f}", f"{b['target_passes_per_token']:.3f}"),
            ("wire bytes / token", f"{s['wire_bytes_per_token']:.1f}", f"{b['wire_bytes_per_token']:.1f}"),
            ("generated tokens", str(s["generated_tokens"]), str(b["generated_tokens"]))]
    print(f"{'':26}{policy_name:>14}{'cloud-ar':>14}")
    for name, a, c in rows:
        print(f"{name:26}{a:>14}{c:>14}")
    print(f"speedup vs cloud-ar: {report['speedup_vs_cloud_ar']:.2f}x   "
          f"output matches target: {report['output_matches_target']}")
    print(f"draft backend: {report['draft_backend']}   target engine: {report['target_engine']}   "
          f"exact: {report['exact']} (self-test: {exactness.summary()})")
