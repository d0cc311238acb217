"""Hypothesis settings shared by the fuzz tests.

``fuzz(n)`` runs ``n`` generated inputs per test (times ``RESNETLAB_FUZZ_SCALE``, default 1: e.g.
``RESNETLAB_FUZZ_SCALE=20 pytest tests/test_weights_fuzz.py`` for a deep run) and fails any single input
that takes longer than ``RESNETLAB_FUZZ_DEADLINE_MS`` (default 5,000 ms; inputs normally take a few ms,
so this catches pathological slowness without flaking on a busy machine). A real hang, which never
returns, is stopped by pytest-timeout (configured in pyproject.toml).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("RESNETLAB_FUZZ_SCALE", "1"))
DEADLINE_MS = int(os.environ.get("RESNETLAB_FUZZ_DEADLINE_MS", "5000"))


def fuzz(examples: int) -> settings:
    """Settings for a fuzz target: ``examples`` inputs (scaled), a per-input deadline, no database noise."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=DEADLINE_MS,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
