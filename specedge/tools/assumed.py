"""Profiles of machines nobody here has run on, built from their published figures: an assumption,
labelled as one wherever it is used.

A decode or verify pass of a transformer reads every weight once and every cached position of
each session once, and computes 2 flops per weight per row plus attention over the context. On a
GPU that pass takes the longer of the two at some achieved share of the datasheet's bandwidth and
peak, plus a fixed cost per pass (launches, the engine's own scheduling):

    ms(S sessions, k rows, context c) = overhead + max(bytes / (B * eff_b), flops / (F * eff_f))
    bytes = weight_bytes + S * c * kv_bytes_per_position
    flops = S * k * (2 * matmul_params + 4 * n_layers * dim * c)

The datasheet figures (B, F) are cited per machine. The efficiencies and the overhead are
assumptions, the same for every machine of a kind, stated in every profile made here: a profile
measured by `specedge profile` on the machine replaces this one.
"""
from __future__ import annotations

from specedge.emulation import PROFILE_FORMAT

# Model shapes, as each model's published config.json gives them (tiny: the test pair's).
SHAPES = {
    "tiny": dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128),
    "qwen2.5-0.5b": dict(n_layers=24, dim=896, n_heads=14, n_kv_heads=2, ffn_dim=4864, vocab_size=151936),
    "qwen2.5-1.5b": dict(n_layers=28, dim=1536, n_heads=12, n_kv_heads=2, ffn_dim=8960, vocab_size=151936),
    "qwen2.5-7b": dict(n_layers=28, dim=3584, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064),
    "qwen2.5-14b": dict(n_layers=48, dim=5120, n_heads=40, n_kv_heads=8, ffn_dim=13824, vocab_size=152064),
    "qwen2.5-32b": dict(n_layers=64, dim=5120, n_heads=40, n_kv_heads=8, ffn_dim=27648, vocab_size=152064),
}
TIED = {"tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"}  # output head = the embedding (tie_word_embeddings)

# Datasheet figures: memory bandwidth (bytes/s) and dense 16-bit tensor peak (flop/s).
HARDWARE = {
    "h100-sxm": dict(kind="gpu", bandwidth=3.35e12, flops=989e12,
                     source="NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB): 3.35 TB/s HBM3, "
                            "989 TFLOPS BF16 dense"),
    "a100-sxm": dict(kind="gpu", bandwidth=2.039e12, flops=312e12,
                     source="NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM): 2,039 GB/s HBM2e, "
                            "312 TFLOPS BF16 dense"),
    "l4": dict(kind="gpu", bandwidth=300e9, flops=121e12,
               source="NVIDIA L4 Tensor Core GPU datasheet: 300 GB/s GDDR6, 121 TFLOPS BF16 dense"),
    "orin-nano-8gb": dict(kind="jetson", bandwidth=68e9, flops=10e12,
                          source="NVIDIA Jetson Orin Nano 8GB module datasheet: 68 GB/s LPDDR5, "
                                 "40 INT8 TOPS sparse (FP16 dense taken as a quarter: 10 TFLOPS)"),
    "agx-orin-64gb": dict(kind="jetson", bandwidth=204.8e9, flops=68e12,
                          source="NVIDIA Jetson AGX Orin 64GB module datasheet: 204.8 GB/s LPDDR5, "
                                 "275 INT8 TOPS sparse (FP16 dense taken as a quarter: 68 TFLOPS)"),
}
# The assumptions: what share of the datasheet an LLM engine achieves, and its cost per pass
# (a GPU server engine with CUDA graphs; llama.cpp's CUDA backend on a Jetson).
ASSUMED = {
    "gpu": dict(bandwidth_efficiency=0.7, flops_efficiency=0.5, overhead_ms=1.5, engine="vllm (assumed)"),
    "jetson": dict(bandwidth_efficiency=0.7, flops_efficiency=0.5, overhead_ms=2.0, engine="llama.cpp CUDA (assumed)"),
}
BYTES_PER_WEIGHT = {"bf16": 2.0, "q8_0": 8.5 / 8, "q4_k_m": 4.85 / 8}
KV_BYTES = 2  # f16 keys and values


def shape_params(shape: dict) -> tuple[float, float]:
    """(weights a pass reads, of which the matmuls' rows multiply by): the layers and the LM head
    (the embedding table is only looked up)."""
    dim, heads, kv_heads, ffn = shape["dim"], shape["n_heads"], shape["n_kv_heads"], shape["ffn_dim"]
    kv_dim = dim // heads * kv_heads
    layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn
    matmul = shape["n_layers"] * layer + shape["vocab_size"] * dim
    return matmul, matmul


def kv_bytes_per_position(shape: dict) -> int:
    return 2 * shape["n_layers"] * shape["dim"] // shape["n_heads"] * shape["n_kv_heads"] * KV_BYTES


def pass_ms(shape: dict, hardware: str, dtype: str, sessions: int, rows: int, context: int) -> float:
    hw = HARDWARE[hardware]
    a = ASSUMED[hw["kind"]]
    weights, matmul = shape_params(shape)
    nbytes = weights * BYTES_PER_WEIGHT[dtype] + sessions * context * kv_bytes_per_position(shape)
    flops = sessions * rows * (2 * matmul + 4 * shape["n_layers"] * shape["dim"] * context)
    seconds = max(nbytes / (hw["bandwidth"] * a["bandwidth_efficiency"]), flops / (hw["flops"] * a["flops_efficiency"]))
    return a["overhead_ms"] + 1000 * seconds


def assumed_profile(kind: str, hardware: str, shape_name: str, dtype: str, contexts=(32, 128, 512, 1024, 2048),
                    prefill_rows=(2, 4, 8, 32, 128, 512, 1024), grid=(1, 2, 4, 8, 16, 32, 64),
                    base_context: int = 128) -> dict:
    """A `specedge profile` JSON for `kind` (target or draft) on `hardware`, from the roofline."""
    shape = SHAPES[shape_name]
    hw, a = HARDWARE[hardware], ASSUMED[HARDWARE[hardware]["kind"]]
    ms = lambda s, k, c: round(pass_ms(shape, hardware, dtype, s, k, c), 4)
    profile = {
        "format": PROFILE_FORMAT, "kind": kind, "engine": a["engine"], "model": shape_name,
        "weights": f"none: {dtype} weights assumed", "assumed": True, "emulated": False,
        "assumption": {"hardware": hardware, "source": hw["source"], "dtype": dtype,
                       "bytes_per_weight": BYTES_PER_WEIGHT[dtype], **{k: v for k, v in a.items() if k != "engine"},
                       "model": "ms = overhead + max(bytes / (bandwidth * eff), flops / (peak * eff)) "
                                "(specedge/tools/assumed.py)"},
        "machine": {"cpu": None, "cores": None, "gpu": hardware, "cpus": []},
        "decode_ms": {str(c): ms(1, 1, c) for c in contexts},
        "prefill_ms_per_token": {str(n): round(ms(1, n, 0) / n, 4) for n in prefill_rows},
        "base_context": base_context, "context_cost": "per_session", "prompt_batch": 0,
        "bytes_per_position": kv_bytes_per_position(shape),
        "shape": {"vocab_size": shape["vocab_size"], "n_layers": shape["n_layers"]},
        "repeats": 0,
    }
    if kind == "target":
        profile["verify"] = {"context": base_context, "sessions": list(grid), "rows": list(grid),
                             "ms": [[ms(s, k, base_context) for k in grid] for s in grid], "skipped": {}}
    return profile
