"""blockquant benchmarks: `python -m benchmarks {weights,run,policy,kernels}` (see __main__.py)."""
