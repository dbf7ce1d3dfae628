#!/usr/bin/env bash
# Build the k-diffusion side environment the parity suite drives (see shared PEERS.md): only
# k_diffusion/sampling.py and the one helper it imports, plus its three light dependencies, in
# ./peers (git-ignored). k-diffusion's own __init__ pulls torchvision and CLIP, so it is never
# installed. Usage: bash scripts/setup_peers.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
if [ -f peers/k_diffusion/sampling.py ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps k-diffusion==0.1.1.post1 -d "$tmp/dl"
"$py" -m zipfile -e "$tmp"/dl/k_diffusion-0.1.1.post1-py3-none-any.whl "$tmp/whl"
mkdir -p peers/k_diffusion
cp "$tmp/whl/k_diffusion/sampling.py" peers/k_diffusion/
touch peers/k_diffusion/__init__.py
"$py" - "$tmp/whl/k_diffusion/utils.py" peers/k_diffusion/utils.py <<'PY'
import ast, sys
src = open(sys.argv[1]).read()
fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "append_dims")
open(sys.argv[2], "w").write(ast.get_source_segment(src, fn) + "\n")
PY
"$py" -m pip install -q --no-deps --target peers torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2
echo "k-diffusion side environment in peers/"
