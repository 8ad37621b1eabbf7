"""Shared pytest configuration: a deterministic Hypothesis profile for the whole suite.

`blockquant` (the default) derandomises Hypothesis so every run draws the same examples, keeps
no example database and has no deadline (the reference runs on CPU and its first call warms
up torch). HYPOTHESIS_PROFILE=blockquant-long draws ten times as many examples, for sweeps.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(derandomize=True, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("blockquant", max_examples=40, **_COMMON)
settings.register_profile("blockquant-long", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "blockquant"))
