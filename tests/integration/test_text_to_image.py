"""Text-to-image through every edge: the library, the CLI's --prompt / --negative-prompt, HTTP
prompt / negative_prompt (limits, 422s, batching, provenance, audit replay), and a tiny training
run on captioned MNIST that exports a loadable pipeline."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch

from difforge.cli import main
from difforge.common.png import png_pixels
from difforge.pipeline import RequestInvalid, load
from difforge.serving import png_text
from tests.integration.serving_fixtures import make_service, run, running
from tests.text_fixtures import make_tiny_text_model

FAST = {"torch_threads": 1, "warmup_steps": 1}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_text_model(tmp_path_factory.mktemp("text") / "tiny-text", backbone="unet")


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_library_prompts_negative_prompts_and_batch_independence(backbone, tmp_path):
    m = load(make_tiny_text_model(tmp_path / backbone, backbone=backbone))
    kw = {"steps": 3, "guidance": 3.0}
    both = m.sample(n=2, cond={"prompt": ["a thick 7", "a thin 3"]}, seeds=[5, 6], **kw)
    alone = m.sample(cond={"prompt": "a thin 3"}, seeds=[6], **kw)
    assert torch.equal(both.images[1], alone.images[0])  # a row does not see its neighbours
    assert not torch.equal(
        both.images[0], m.sample(cond={"prompt": "a thin 3"}, seeds=[5], **kw).images[0]
    )
    neg = m.sample(cond={"prompt": "a thin 3", "negative_prompt": "a thick 7"}, seeds=[6], **kw)
    assert not torch.equal(neg.images[0], alone.images[0])  # the negative replaces the null branch
    empty_neg = m.sample(cond={"prompt": "a thin 3", "negative_prompt": ""}, seeds=[6], **kw)
    assert torch.equal(empty_neg.images[0], alone.images[0])  # "" is the null prompt
    assert neg.conditioning == {"prompt": ["a thin 3"], "negative_prompt": ["a thick 7"]}
    with pytest.raises(RequestInvalid, match="limit is 5"):
        m.sample(cond={"prompt": "a 7 a 7 a 7"}, seed=0)


def test_cli_prompt_flags_record_the_prompt_in_the_png(text_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(text_model), "--prompt", "a thick 7", "--n", "2"]
    with pytest.raises(SystemExit) as ok:
        main([*argv, "--negative-prompt", "a 3", "--seed", "1", "--steps", "2", "--out", str(out)])
    assert ok.value.code == 0
    meta = png_text(out.read_bytes())
    assert "a thick 7" in json.dumps(meta) and "negative_prompt" in json.dumps(meta)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(text_model), "--prompt", "a\x07", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "control character" in err


def _images(body):
    return [png_pixels(base64.b64decode(img["png_base64"])) for img in body["images"]]


def test_http_prompts_validate_batch_together_and_replay(text_model, tmp_path):
    bad = [
        {"prompt": "x" * 41},  # over the service's max_prompt_chars
        {"prompt": "a 7 a 7 a 7"},  # over the tokenizer's token limit
        {"prompt": "a \u0000 7"},
        {"prompt": 7},
        {"prompt": "a 7", "negative_prompt": "\u001b[2J"},
        {"prompt": "a 7", "negativ_prompt": "a 3"},
    ]

    async def scenario():
        svc = make_service(
            text_model, **FAST, audit_db=str(tmp_path / "a.sqlite3"), batch_wait_ms=400
        )
        svc = svc.__class__(
            svc.config.model_copy(
                update={"limits": svc.config.limits.model_copy(update={"max_prompt_chars": 40})}
            ),
            svc.router,
        )
        async with running(svc) as c:
            for body in bad:
                r = await c.post("/v1/generate", json=body)
                assert r.status_code == 422, body
                assert r.json()["detail"][0]["loc"][0] == "body", body
            r = await c.post(
                "/v1/generate", json={"prompt": "a thick 7", "negative_prompt": "a 3", "seed": 3}
            )
            assert r.status_code == 200
            cond = json.loads(png_text(r.content)["conditioning"])
            assert cond == {"prompt": "a thick 7", "negative_prompt": "a 3"}
            bodies = [
                {"prompt": "a thick 7", "seed": 10, "guidance": 2.0},
                {"prompt": "the digit three", "seed": 11, "guidance": 2.0},
                {"prompt": "seven", "negative_prompt": "a 3", "seed": 12, "guidance": 2.0},
            ]
            rs = await asyncio.gather(
                *[c.post("/v1/generate", json={**b, "response_format": "json"}) for b in bodies]
            )
            got = [x.json() for x in rs]
            assert all(x.status_code == 200 for x in rs)
            # three prompts, one with a negative prompt, shared one sampler call (>= 3: padding)
            assert all(len(g["batch_images"]) == 1 and g["batch_images"][0] >= 3 for g in got)
            record = (await c.get(f"/v1/requests/{got[2]['request_id']}")).json()["record"]
            assert record["params"]["negative_prompt"] == ["a 3"]
            replay = (await c.post("/v1/generate", json=record["params"])).json()
            assert replay["output_sha256"] == got[2]["output_sha256"]
            models = (await c.get("/v1/models")).json()["models"][0]
            assert models["conditioning"][0]["kind"] == "text"
            assert "tokenizer" not in models["conditioning"][0]  # kilobytes the page never reads

    run(scenario())


def test_training_on_captions_exports_a_text_pipeline(tmp_path):
    from difforge.training import load_config, train

    cfg = load_config("configs/mnist_text_unet.json")
    cfg = cfg.model_copy(
        update={
            "dataset": {"kind": "mnist_captions", "limit": 64, "max_tokens": 12},
            "max_steps": 2,
            "batch_size": 4,
            "checkpoint_every": 10,
        }
    )
    result = train(cfg, tmp_path / "run", progress=False)
    m = load(result.model_dir)
    assert m.spec.keys[0].kind == "text" and m.num_classes == 0
    s = m.sample(cond={"prompt": "a thick 7"}, seed=0, steps=2)
    assert s.captions == ("a thick 7",) and np.asarray(s.images).shape == (1, 1, 28, 28)
