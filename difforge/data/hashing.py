"""Content hashes of datasets: sha256 over the decoded examples and labels, not the files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def content_hash(
    images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None
) -> str:
    """sha256 of (shape, dtype, bytes) of the decoded images and of the labels, as 'sha256:<hex>'.

    Two datasets with the same pixels and labels in the same order hash equal, whatever files,
    compression or container they came from.
    """
    h = hashlib.sha256()
    for name, arr in (("images", images), ("labels", labels)):
        if arr is None:
            h.update(f"{name}:none;".encode())
            continue
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def json_hash(parts: Sequence[Any]) -> str:
    """sha256 of the JSON of `parts` (default `json.dumps` form), as 'sha256:<hex>': the content
    hash of a data set derived from others (their hashes, its options and generated text)."""
    return "sha256:" + hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()
