import sys
from pathlib import Path

import pytest
import torch

# Test modules that hold model builders shared across the tree (tests/compact/test_compact.py:
# make_chain, mixed_net...; tests/graph/test_analysis.py: UserCNN) import by their bare names,
# whichever test file is run alone.
_HERE = Path(__file__).resolve().parent
for _sub in ("compact", "graph"):
    if str(_HERE / _sub) not in sys.path:
        sys.path.insert(0, str(_HERE / _sub))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the machine's 2 cores are shared, and oversubscribed threads run many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
