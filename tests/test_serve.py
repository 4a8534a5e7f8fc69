"""difflab serve through Flask's test client: what a job returns is exactly what the pipeline
gives for the same settings, edits keep their exact limits, and bad input of every kind gets
an HTTP 4xx with a message while the server goes on serving.

The models are written with random weights (tests/test_pipeline.py's write_run): nothing is
trained, and random weights keep the comparisons from being vacuous.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import CLASSES, UNET, FakeEncoder, write_run

pytest.importorskip("flask", reason="difflab serve needs the serve extra (Flask)")

from difflab.cli.main import main  # noqa: E402
from difflab.cli.serve import is_loopback  # noqa: E402
from difflab.data import to_uint8  # noqa: E402
from difflab.editing import truncated_grid  # noqa: E402
from difflab.serve import ServeLimits, create_app, load_models  # noqa: E402
from difflab.serve.app import LOOPBACK_HOSTS  # noqa: E402
from difflab.serve.images import read_image  # noqa: E402
from difflab.serve.work import expected_nfe  # noqa: E402

LIMITS = ServeLimits(max_upload_bytes=64 * 1024, max_image_side=256, max_count=4,
                     max_steps=40, max_queue=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    """Two runs (class-conditional and text) and a client of an app over them."""
    root = tmp_path_factory.mktemp("serve")
    write_run(root / "digits", "unet", {**UNET, "num_classes": 3}, class_names=CLASSES)
    write_run(root / "shapes", "unet", {**UNET, "context_dim": 8, "attention_resolutions": [8]},
              class_names=["a dot"], text_encoder="fake-encoder-for-tests")
    models = load_models([root / "digits", root / "shapes"])
    app = create_app(models, LIMITS)
    yield app.test_client(), models, root
    app.extensions["difflab_jobs"].close(timeout=10)


@pytest.fixture
def fake_text(monkeypatch):
    monkeypatch.setattr("difflab.text.TextEncoder", FakeEncoder)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def wait(client, job_id: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/api/jobs/{job_id}").get_json()
        if job["status"] in ("done", "error"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def run_job(client, form: dict, **files: bytes) -> tuple[dict, list[np.ndarray]]:
    data = {**form, **{k: (io.BytesIO(v), f"{k}.png") for k, v in files.items()}}
    resp = client.post("/api/jobs", data=data, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    job = wait(client, resp.get_json()["id"])
    assert job["status"] == "done", job["error"]
    images = [np.asarray(Image.open(io.BytesIO(client.get(u).data))) for u in job["images"]]
    return job, images


def uint8_hwc(x: torch.Tensor) -> list[np.ndarray]:
    return [a[..., 0] if a.shape[-1] == 1 else a
            for a in to_uint8(x).permute(0, 2, 3, 1).numpy()]


def test_info_names_models_but_no_paths(served):
    client, _, root = served
    body = client.get("/api/info").get_json()
    assert [m["name"] for m in body["models"]] == ["digits", "shapes"]
    assert body["models"][0]["conditioning"] == "class"
    assert body["models"][1]["negative_prompt"] is True
    assert "ddim" in body["samplers"] and body["limits"]["max_count"] == 4
    assert str(root) not in client.get("/api/info").get_data(as_text=True)


def test_generate_is_the_pipelines_sample_for_those_seeds(served):
    client, models, _ = served
    job, images = run_job(client, {"model": "digits", "class": "b", "sampler": "dpmpp_2m",
                                   "steps": "5", "guidance": "2.5", "seed": "7", "count": "3"})
    ref = models[0].pipe(3, labels="b", sampler="dpmpp_2m", steps=5, guidance=2.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(images, uint8_hwc(ref.samples),
                                                    strict=True))
    s = job["settings"]
    assert (s["model"], s["class"], s["seeds"], s["guidance"]) == ("digits", "b", [7, 8, 9], 2.5)
    assert job["nfe"] == job["expected_nfe"] == 5 and job["progress"] == 1.0
    dl = client.get(job["settings_url"])
    assert dl.get_json() == s and "attachment" in dl.headers["Content-Disposition"]


def test_text_model_prompt_and_negative_prompt(served, fake_text):
    client, models, _ = served
    form = {"model": "1", "prompt": "red", "negative_prompt": "green", "guidance": "2",
            "steps": "3", "count": "2", "seed": "1"}
    job, images = run_job(client, form)
    ref = models[1].pipe(2, prompt="red", negative_prompt="green", guidance=2.0, steps=3,
                         seed=1, sampler="ddim")
    assert all(np.array_equal(a, b) for a, b in zip(images, uint8_hwc(ref.samples),
                                                    strict=True))
    assert job["settings"]["negative_prompt"] == "green"


def test_expected_evaluations_match_a_real_run_for_a_two_stage_sampler(served):
    client, models, _ = served
    job, _ = run_job(client, {"model": "digits", "sampler": "heun", "steps": "4", "count": "1"})
    ts = truncated_grid(models[0].pipe.process, 4, 1.0)
    assert job["nfe"] == job["expected_nfe"] == expected_nfe(models[0].pipe, "heun", ts) > 4


def digit_image(value: int = 200) -> bytes:
    a = np.zeros((32, 48), np.uint8)
    a[8:24, 12:36] = value
    return png(a)


def test_sdedit_at_strength_zero_gives_the_input_back(served):
    client, models, _ = served
    job, images = run_job(client, {"model": "digits", "mode": "sdedit", "strength": "0",
                                   "steps": "6", "count": "2"}, image=digit_image())
    x = read_image(digit_image(), 1, 8, LIMITS)
    assert all(np.array_equal(a, uint8_hwc(x[None])[0]) for a in images)
    assert job["settings"]["strength"] == 0.0 and len(job["settings"]["input_sha256"]) == 64
    _, moved = run_job(client, {"model": "digits", "mode": "sdedit", "strength": "0.8",
                                "steps": "6"}, image=digit_image())
    assert not np.array_equal(moved[0], images[0])


def test_inpaint_keeps_the_unpainted_part_exactly(served):
    client, _, _ = served
    mask = np.zeros((256, 256, 4), np.uint8)
    mask[:, 128:, 3] = 255  # the right half painted (a canvas's alpha)
    job, images = run_job(client, {"model": "digits", "mode": "inpaint", "steps": "5",
                                   "count": "2", "seed": "3"},
                          image=digit_image(), mask=png(mask))
    x = uint8_hwc(read_image(digit_image(), 1, 8, LIMITS)[None])[0]
    for out in images:
        assert np.array_equal(out[:, :4], x[:, :4])
    assert not np.array_equal(images[0][:, 4:], x[:, 4:])
    assert job["settings"]["mask_pixels"] == 32 and job["settings"]["seeds"] == [3, 4]


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a decompression bomb's
    first bytes: nothing may be decoded before the size is checked)."""
    data = png(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:16] + ihdr + crc + data[33:]


BAD = [
    ({"guidance": "nan"}, "guidance must be between"),
    ({"guidance": "inf"}, "guidance must be between"),
    ({"guidance": "1e9"}, "guidance must be between"),
    ({"steps": "0"}, "steps must be between 1 and 40"),
    ({"steps": "100000"}, "steps must be between"),
    ({"count": "1000000"}, "count must be between 1 and 4"),
    ({"count": "two"}, "count must be a whole number"),
    ({"seed": "-1"}, "seed must be between"),
    ({"sampler": "nope"}, "unknown sampler 'nope'"),
    ({"mode": "shell"}, "unknown mode"),
    ({"model": "/etc/passwd"}, "unknown model"),
    ({"model": "../digits"}, "unknown model"),
    ({"model": "7"}, "unknown model"),
    ({"class": "zebra"}, "class: unknown class"),
    ({"prompt": "a red circle"}, "takes no prompts"),
    ({"model": "shapes", "class": "a"}, "has no classes"),
    ({"model": "shapes", "prompt": "x" * 301}, "longer than 300"),
    ({"model": "shapes", "negative_prompt": "blue"}, "other than 1"),
    ({"mode": "sdedit"}, "sdedit needs an image"),
]


@pytest.mark.parametrize("form,message", BAD, ids=[str(f)[:40] for f, _ in BAD])
def test_bad_fields_are_refused_with_a_message(served, form, message):
    client, _, _ = served
    resp = client.post("/api/jobs", data=form)
    assert resp.status_code == 400 and message in resp.get_json()["error"]


UPLOADS = [
    (b"", "upload is empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image file"),
    (b"GIF89a garbage", "not an image file"),
    (digit_image()[:60], "corrupt or cut short"),
    (bomb_png(100_000, 100_000), "too large to decode; at most 256x256"),
    (bomb_png(5000, 3000), "5000x3000 pixels; at most 256x256"),
    (png(np.zeros((10, 257), np.uint8)), "10 pixels; at most 256x256"),
]


@pytest.mark.parametrize("data,message", UPLOADS, ids=range(len(UPLOADS)))
def test_bad_uploads_are_refused_on_preview_and_job(served, data, message):
    client, _, _ = served
    for url, form in (("/api/preview", {"model": "0"}),
                      ("/api/jobs", {"model": "0", "mode": "sdedit"})):
        resp = client.post(url, data={**form, "image": (io.BytesIO(data), "x.png")})
        assert resp.status_code == 400 and message in resp.get_json()["error"], resp.get_json()


def test_inpaint_needs_a_painted_mask(served):
    client, _, _ = served
    empty = png(np.zeros((64, 64, 4), np.uint8))
    for files, message in (({}, "needs a mask"), ({"mask": empty}, "mask is empty")):
        data = {"mode": "inpaint", "image": (io.BytesIO(digit_image()), "i.png"),
                **{k: (io.BytesIO(v), "m.png") for k, v in files.items()}}
        resp = client.post("/api/jobs", data=data)
        assert resp.status_code == 400 and message in resp.get_json()["error"]


def test_preview_is_the_image_as_the_model_sees_it(served):
    client, _, _ = served
    body = client.post("/api/preview", data={"model": "digits",
                                             "image": (io.BytesIO(digit_image()), "a.png")})
    import base64
    raw = base64.b64decode(body.get_json()["image"].split(",", 1)[1])
    x = uint8_hwc(read_image(digit_image(), 1, 8, LIMITS)[None])[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw))), x)


def test_a_body_over_the_limit_is_413_with_a_message(served):
    client, _, _ = served
    resp = client.post("/api/jobs", data={"mode": "sdedit",
                                          "image": (io.BytesIO(b"\0" * 70_000), "big.png")})
    assert resp.status_code == 413 and "at most 0.0625 MiB" in resp.get_json()["error"]


def test_no_path_outside_the_package_or_the_jobs(served):
    client, _, _ = served
    for url in ("/static/../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml",
                "/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/nope/0.png",
                "/api/jobs/nope/settings.json", "/etc/passwd"):
        resp = client.get(url)
        assert resp.status_code == 404 and "root:" not in resp.get_data(as_text=True)
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/").headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert client.delete("/api/jobs").status_code == 405


def test_one_job_at_a_time_while_the_server_answers(served, monkeypatch):
    """A job that blocks: the next waits queued, the API answers meanwhile, the queue's
    limit gives 429, and a job that crashes is reported while the worker goes on."""
    client, _, _ = served
    gate, started = threading.Event(), threading.Event()

    def blocking(req, model, report):
        started.set()
        assert gate.wait(10)
        if req.seed == 13:
            raise RuntimeError("boom")
        return torch.zeros(req.count, 1, 8, 8)

    monkeypatch.setattr("difflab.serve.app.run_request", blocking)
    first = client.post("/api/jobs", data={"steps": "2"}).get_json()
    assert started.wait(10)
    second = client.post("/api/jobs", data={"steps": "2", "seed": "13"}).get_json()
    assert second["ahead"] == 1
    assert client.get(f"/api/jobs/{first['id']}").get_json()["status"] == "running"
    assert client.get(f"/api/jobs/{second['id']}").get_json()["status"] == "queued"
    assert client.get("/api/info").status_code == 200
    full = client.post("/api/jobs", data={"steps": "2"})
    assert full.status_code == 429 and "already waiting" in full.get_json()["error"]
    gate.set()
    assert wait(client, first["id"])["status"] == "done"
    crashed = wait(client, second["id"])
    assert crashed["status"] == "error" and "RuntimeError: boom" in crashed["error"]
    third = client.post("/api/jobs", data={"steps": "2"}).get_json()
    assert wait(client, third["id"])["status"] == "done"


def test_loopback_server_accepts_only_local_host_names(served):
    _, models, _ = served
    app = create_app(models, LIMITS, trusted_hosts=LOOPBACK_HOSTS)
    try:
        client = app.test_client()
        assert client.get("/api/info", headers={"Host": "localhost:8765"}).status_code == 200
        assert client.get("/api/info", headers={"Host": "127.0.0.1:8765"}).status_code == 200
        assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 400
    finally:
        app.extensions["difflab_jobs"].close(timeout=10)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_cli_help_and_refusals(served, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "127.0.0.1" in text and "--max-upload-mb" in text and "RUN" in text
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "RUN does not exist" in capsys.readouterr().err
    _, _, root = served
    assert main(["serve", str(root / "digits"), "--port", "70000"]) == 2
    assert main(["serve", str(root / "digits"), "--max-count", "0"]) == 2


def test_a_latent_model_generates_and_inpaints(tmp_path, one_thread):
    """A latent model: the served sample is pipe(...)'s; inpainting edits the latents and
    pastes the unpainted pixels back exactly."""
    from test_latent import images, latent_config, write_autoencoder

    from difflab.recipes import DiffusionRecipe

    ae, _ = write_autoencoder(tmp_path / "ae")
    recipe = DiffusionRecipe(latent_config(tmp_path, ae), data=images())
    recipe.run(progress=False)
    models = load_models([recipe.out_dir])
    app = create_app(models, LIMITS)
    client = app.test_client()
    try:
        assert models[0].info(0)["latent"] and models[0].info(0)["channels"] == 3
        _, out = run_job(client, {"class": "c", "steps": "3", "count": "2", "seed": "4"})
        ref = models[0].pipe(2, labels="c", steps=3, seed=4, sampler="ddim")
        assert all(np.array_equal(a, b) for a, b in zip(out, uint8_hwc(ref.samples),
                                                        strict=True))
        rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[40:, :] = 255  # the bottom part painted (a grey-level mask)
        job, out = run_job(client, {"mode": "inpaint", "steps": "3"}, image=png(rgb),
                           mask=png(mask))
        assert np.array_equal(out[0][:10], rgb[:10]) and not np.array_equal(out[0], rgb)
        assert job["settings"]["mask_pixels"] == 6 * 16
    finally:
        app.extensions["difflab_jobs"].close(timeout=10)
