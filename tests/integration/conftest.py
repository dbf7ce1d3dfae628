"""Fixtures of the integration tests (the tiny serving model)."""

from __future__ import annotations

import pytest

from tests.integration.serving_fixtures import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny 8x8 model folder (serving_fixtures.make_tiny_model), one per test module."""
    return make_tiny_model(tmp_path_factory.mktemp("serving") / "tiny")
