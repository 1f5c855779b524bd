"""The harness: benchmarks, fault injection, soak and fuzz runs, the channel emulator and the demo.

These modules drive the product from outside (they start brokers, verifiers and agents, shape
links, inject faults and measure) and are not part of it. The rule: no product module
(specedge/*.py outside tools/, device/, cloud/, kernels/) imports from specedge.tools; only the
CLI's command table (specedge/cli.py), the GPU check (specedge/gpu_check.py) and the tests do.
tests/test_layout.py enforces it.
"""
