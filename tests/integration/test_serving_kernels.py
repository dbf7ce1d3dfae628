"""batch_invariance "kernels" over HTTP and the CLI: the network runs with batch-invariant kernels
(difforge.nets.invariant) on whatever arrived, unpadded and unchunked; a request's bytes are the
same alone or in a crowd, and the same as `Model.with_backend("eager", kernels="invariant")`
in-process. (The probe's fallback is in test_serving_http's batch-dependent-kernels test.)"""

from __future__ import annotations

import numpy as np
import torch

from difforge.model import load
from tests.integration.serving_fixtures import make_service, run, running
from tests.integration.test_serving_chunked import FAST, _alone_and_crowded


def _one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_served_bytes_are_the_in_process_invariant_kernel_bytes(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST, batch_invariance="kernels")
        async with running(svc) as c:
            version = svc.router.production
            assert version.plan.mode == "kernels" and version.plan.chunk_rows is None
            assert version.model.backend.invariant  # the served model runs the kernels
            info = (await c.get("/v1/models")).json()["models"][0]["batching"]
            assert info == {"mode": "kernels", "invariant": True, "chunk_rows": None}
            reports = version.plan.probe["reports"]
            assert all(not r["sizes_differing"] and not r["differing"] for r in reports)
            alone, crowded, bodies = await _alone_and_crowded(c)
            assert max(bodies[0]["batch_images"]) > 1  # it did share a call (and is not padded:)
            assert all(b["batch_invariant"] is True for b in bodies)
            metrics = (await c.get("/metrics")).text
            padding = [ln for ln in metrics.splitlines() if ln.startswith("difforge_padding")]
            assert all(ln.endswith(" 0.0") for ln in padding if "_total" in ln)
            return alone, crowded

    alone, crowded = run(scenario())
    model = load(model_dir)
    kwargs = {"labels": [3], "seed": 7, "guidance": 2.0}
    fast = model.with_backend("eager", kernels="invariant")
    invariant = _one_thread(lambda: fast.sample(**kwargs).images[0, 0].numpy())
    assert np.array_equal(alone, invariant) and np.array_equal(crowded, invariant)
    assert 0 < invariant.mean() < 255


def test_library_bytes_do_not_depend_on_the_batch(model_dir):
    """Model.sample with the kernels: 9 guided images in one call == each alone, to the float."""
    from difforge.pipeline import resolve

    model = load(model_dir).with_backend("eager", kernels="invariant")
    request = {"labels": list(range(9)), "seed": 11, "guidance": 2.5, "steps": 3}

    def both():
        plan = resolve(model, request)
        x, _ = model.sample_latents(plan.rows, plan)  # (9, 1, 8, 8)
        alone = []
        for i in range(9):
            one = resolve(model, {**request, "labels": [i], "seed": 11 + i})
            alone.append(model.sample_latents(one.rows, one)[0])
        return x, torch.cat(alone)

    x, alone = _one_thread(both)
    assert torch.equal(x, alone)
    eager = load(model_dir)
    plan = resolve(eager, request)
    assert not torch.equal(_one_thread(lambda: eager.sample_latents(plan.rows, plan)[0]), x)


def test_cli_sample_with_invariant_kernels_does_not_depend_on_the_batch_size(model_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from difforge.cli import app

    runner = CliRunner()
    args = ["sample", "--model", str(model_dir), "--seed", "3", "--steps", "3"]
    args += ["--labels", "0,1,2,3,4", "--guidance", "2.5", "--kernels", "invariant"]

    def grids():
        out = []
        for flags in (["--batch-size", "1"], ["--batch-size", "5"], ["--batch-size", "3"]):
            path = tmp_path / f"g{len(out)}.png"
            r = runner.invoke(app, [*args, *flags, "--out", str(path)])
            assert r.exit_code == 0, r.output
            out.append(np.asarray(Image.open(path)))
        return out

    one, five, three = _one_thread(grids)
    assert np.array_equal(one, five) and np.array_equal(one, three)
    bad = runner.invoke(app, [*args[:-1], "fast", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and "invariant" in bad.output


def test_a_cascade_serves_both_stages_with_the_kernels(tmp_path):
    import pytest

    from difforge.core.errors import InvalidArgumentError
    from difforge.nets.invariant import is_batch_invariant
    from difforge.serving.invariance import serving_model
    from tests.upscale_fixtures import make_tiny_cascade

    cascade_dir, _, _ = make_tiny_cascade(tmp_path)
    cascade = load(cascade_dir)
    fast = serving_model(cascade, "kernels")
    assert fast.sha256 == cascade.sha256 and fast.backend.invariant
    for stage in (fast.base, fast.upsampler):
        assert is_batch_invariant(stage.denoiser)
    assert not is_batch_invariant(cascade.base.denoiser)  # the loaded cascade is unchanged
    with pytest.raises(InvalidArgumentError, match="cascade"):
        cascade.with_backend("compile")

    def both():
        crowd = fast.sample(labels=[4, 1, 7], seeds=[3, 5, 9], guidance=2.0).images
        return crowd, fast.sample(labels=[1], seeds=[5], guidance=2.0).images

    crowd, alone = _one_thread(both)
    assert crowd.shape == (3, 1, 16, 16) and torch.equal(crowd[1], alone[0])


def test_the_default_model_serves_with_the_kernels_by_default():
    """models/mnist-cond under the default config: the probe passes, so it serves "kernels"
    (a fallback to "per_sample" would serve one image per call)."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "models" / "mnist-cond"

    async def scenario():
        svc = make_service(shipped, torch_threads=1, warmup_steps=1)
        async with running(svc):
            return svc.router.production.plan.describe()

    assert run(scenario()) == {"mode": "kernels", "invariant": True, "chunk_rows": None}
