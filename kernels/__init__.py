"""Hot math for GPUs and Jetsons: CUDA sources next to their NumPy references.

sampling.cu holds the drafting kernels (greedy argmax; temperature, top-k/top-p, softmax,
fixed-point quantisation and sampling fused; the wire encoder of q). Their references are
`specedge.speculative` (softmax, truncate, quantize, sample_sparse) and `specedge.protocol.wire.encode_q`.
build.py compiles them with nvcc; cuda.py runs them with pycuda.
"""
