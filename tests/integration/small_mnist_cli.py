"""A torchrun entry point: difforge's CLI with MNIST cut to 1000 test / 2000 train images, as in
tests/integration/test_cli_evaluate.py, so a distributed evaluation test takes seconds."""

from __future__ import annotations

import sys

from difforge.cli import main
from difforge.evaluation import against
from tests.integration.test_cli_evaluate import small_mnist

against.load_mnist = small_mnist
main(sys.argv[1:])
