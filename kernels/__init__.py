"""Hot math for GPUs and Jetsons (CUDA sources next to NumPy references).

The NumPy references are `specedge.speculative` (acceptance rules, fixed-point
quantisation, sparse sampling); the CUDA versions of them land here.
"""
