"""Shared pytest configuration: strict kernels, the kernel device, and a deterministic
Hypothesis profile.

QCOMPILE_STRICT=1 (set here, at import, before any test imports qcompile; an explicit value in
the environment wins): a generated kernel that fails raises instead of falling back to the
reference, so a broken kernel fails its test. Formats with no kernel by design still fall back;
tests of the fallback itself switch strict mode off with monkeypatch.

Warnings qcompile gives once per process (qcompile.config.warn) are given again in each test.

`blockquant` (the default) derandomises Hypothesis so every run draws the same examples, keeps
no example database and has no deadline (the reference runs on CPU and its first call warms
up torch). HYPOTHESIS_PROFILE=blockquant-long draws ten times as many examples, for sweeps.
"""
import os

os.environ.setdefault("QCOMPILE_STRICT", "1")
# TRITON_INTERPRET must be set before anything imports triton.language (whatever order the test
# files are collected in): kernel_device sets it (or, on a GPU run, clears it)
import kernel_device  # noqa: E402,F401

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(autouse=True)
def each_warning_said_again(monkeypatch):
    """qcompile says each problem once per process; each test gets a fresh "once"."""
    from qcompile import config
    monkeypatch.setattr(config, "_said", set())

_COMMON = dict(derandomize=True, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("blockquant", max_examples=40, **_COMMON)
settings.register_profile("blockquant-long", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "blockquant"))
