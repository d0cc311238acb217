"""How DataLoader worker processes start.

Forking copies a process with its threads' locks and state frozen mid-flight. That is safe for PyTorch,
which resets its thread pools in the child, but not once OpenVINO has run in the process (``--backend
openvino``, ``best``): a DataLoader forked after it killed its parent with SIGSEGV while the workers shut
down (measured in this project's test suite, 2026-12-01). Workers then start from a fork server instead:
a clean process, at the cost of about a second per loader.
"""

from __future__ import annotations

import sys

#: Modules whose threads make ``fork`` unsafe once imported.
FORK_UNSAFE = ("openvino",)


def worker_start_method(num_workers: int) -> str | None:
    """The ``multiprocessing_context`` for a DataLoader with ``num_workers`` workers: None (the platform's
    default, ``fork`` on Linux) unless a fork-unsafe runtime is loaded, then ``forkserver``."""
    if num_workers > 0 and any(name in sys.modules for name in FORK_UNSAFE):
        return "forkserver"
    return None
