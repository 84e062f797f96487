"""One torch thread for the privacy tests, restored afterwards.

These tests train and sample small models for many short steps. On the shared 2-core machine
two threads per process oversubscribe the cores and OpenMP threads spin: the folder measured
423 s at 2 threads against 48 s at 1 under the same load. One thread never fights other
processes for a core, and the results do not depend on the thread count beyond float noise.
"""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _privacy_one_thread(one_thread):
    """Every privacy test module runs on one thread (tests/conftest.py's one_thread)."""
    yield
