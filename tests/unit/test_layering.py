"""The house's arrows point one way: each layer imports only the layers below it.

core <- samplers / nets / data / common <- pipeline <- training / evaluation / registry
<- serving / cli. Read from the source's import statements (module-level and local).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "difforge"
# layer -> the difforge packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "common": {"core"},
    "samplers": {"core"},
    "nets": {"core"},
    "data": {"core", "common"},
    "pipeline": {"core", "common", "samplers", "nets", "data"},
    "training": {"core", "common", "samplers", "nets", "data", "pipeline"},
    "evaluation": {"core", "common", "samplers", "nets", "data", "pipeline"},
    "registry": {"core", "common", "samplers", "nets", "data", "pipeline", "evaluation"},
    "serving": {"core", "common", "samplers", "nets", "data", "pipeline", "registry", "evaluation"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m.split(".")[1] for m in out if m.startswith("difforge.") and m.count(".") >= 1}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    bad = {}
    for path in sorted((ROOT / layer).rglob("*.py")):
        wrong = _imports(path) - ALLOWED[layer] - {layer, "__version__"}
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"imports against the arrows: {bad}"


def test_no_module_is_over_700_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 700
    }
    assert not long, long
