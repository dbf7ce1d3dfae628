"""Thread counts for a measured run: torch's intra-op threads and every loaded OpenBLAS's."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def openblas_thread_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of each OpenBLAS loaded in this process (numpy's and
    scipy's each bundle one), found the way threadpoolctl finds them; [] where there is none."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    controls = []
    for path in sorted(p for p in paths if p.startswith("/") and ".so" in p):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_", "_64_"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    controls.append((get, set_))
                    break
            else:
                continue
            break
    return controls


@contextmanager
def compute_threads(n: int | None) -> Iterator[None]:
    """Run the block with n torch intra-op threads and n OpenBLAS threads (None: leave them).

    Why OpenBLAS too: on busy shared cores, scipy's 2-thread OpenBLAS makes the 128x128 sqrtm
    of every FID take 2.2 s instead of 15 ms (measured on the 2-core dev box under load 6).
    """
    if n is None:
        yield
        return
    blas = openblas_thread_controls()
    before = torch.get_num_threads(), [get() for get, _ in blas]
    torch.set_num_threads(n)
    for _, set_ in blas:
        set_(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        for (_, set_), k in zip(blas, before[1], strict=True):
            set_(k)
