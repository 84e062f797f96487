import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# Tests must be deterministic and not fight over the 2 cores with the ranks they spawn.
torch.set_num_threads(int(os.environ.get("FLEXMOE_TEST_THREADS", "2")))
# `flexmoe train` defaults to trainer.dtype=auto (bf16 on CPUs with AMX, fp32 elsewhere); the tests'
# numbers must not depend on which CPU runs them, so auto means fp32 here (and in the processes the
# tests start). tests/train/test_auto_dtype.py tests the choice itself.
os.environ.setdefault("FLEXMOE_AUTO_DTYPE", "fp32")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SHARED_CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: with more threads than free cores each op waits on the others (measured 150 s
    for tests/flex/test_calibrate.py on 2 busy cores, 15 s on one thread). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
