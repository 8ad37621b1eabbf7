"""blockquant benchmarks: weight error of every format on real weights (more to come)."""
