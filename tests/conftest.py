"""Fixtures shared across the test tiers (helpers that are not fixtures live in tests/helpers.py).

`one_thread` is opt-in (`pytestmark = pytest.mark.usefixtures("one_thread")`), not autouse:
some tests count threads and must see torch's own setting.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module: tiny nets run fastest so, and on
    oversubscribed shared cores 2-thread OpenMP regions stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def extractor():
    """The shipped MNIST feature network (difforge.evaluation.load_feature_extractor)."""
    from difforge.evaluation import load_feature_extractor

    return load_feature_extractor()
