"""``diffloom serve``'s JSON API, driven in-process through Starlette's test client, on the shipped model.

Covers: a generate streams one preview per step in step order and then the final image; stop ends a run within
one step and still writes the image of the latents so far; jobs wait in a first-in first-out queue whose
positions are reported, and two jobs' events never mix; every refusal is a 4xx naming the field; the gallery
reads back the settings each PNG carries, and generating again from them gives the same pixels. Also: the
fitted latent-to-RGB preview map against the SD table on real final latents, and the command's light import.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from diffloom_serve.app import create_app
from diffloom_serve.engine import Engine

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = Engine.load(None, tmp_path_factory.mktemp("outputs"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as client:
        yield client


def read_events(client, job_id, on_event=None) -> list[tuple[str, dict]]:
    """Every server-sent event of a job, until the stream ends; ``on_event(kind, data)`` sees each as it comes."""
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = data = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and kind is not None:
                events.append((kind, data))
                if on_event is not None:
                    on_event(kind, data)
                kind = None
    return events


def submit(client, **settings) -> str:
    response = client.post("/api/generate", json={"prompt": PROMPT, **settings})
    assert response.status_code == 202, response.text
    return response.json()["job"]


def data_url_image(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def pixels(client, url) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def wait_for_step(client, job_id, step: int):
    """Block until the job has finished ``step`` steps (polling its status)."""
    for _ in range(2000):
        state = client.get(f"/api/jobs/{job_id}").json()
        if state["step"] >= step or state["state"] in ("done", "stopped", "error"):
            return state
        threading.Event().wait(0.005)
    raise AssertionError(f"job {job_id} never reached step {step}")


# -- generating ----------------------------------------------------------------------------------------------


def test_generate_streams_every_step_in_order_then_the_image(client, engine):
    job = submit(client, steps=5, seed=11)
    events = read_events(client, job)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    steps = [data for kind, data in events if kind == "step"]
    assert [s["index"] for s in steps] == list(range(5)) and all(s["total"] == 5 for s in steps)
    assert all(data["job"] == job for _, data in events)
    previews = [data_url_image(s["preview"]) for s in steps]
    assert all(p.size == (16, 16) for p in previews)  # one pixel per latent pixel: 128 / 8
    assert len({p.tobytes() for p in previews}) == 5  # each step shows the image changing

    done = events[-1][1]
    assert done["seed"] == 11 and done["steps_done"] == 5 and done["settings"]["prompt"] == PROMPT
    (image,) = done["images"]
    rgb = pixels(client, image["url"])
    assert rgb.shape == (128, 128, 3)
    # The last preview is a coarse view of the final image: its colours follow the decoded picture.
    coarse = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BOX)).astype(float)
    last = np.asarray(previews[-1].convert("RGB")).astype(float)
    assert np.corrcoef(coarse.mean(-1).ravel(), last.mean(-1).ravel())[0, 1] > 0.5
    assert client.get(f"/api/jobs/{job}").json()["state"] == "done"


def test_stop_ends_the_run_within_one_step_and_keeps_the_image(client):
    job = submit(client, steps=150, seed=5)
    answers = []

    def stop_at_third_preview(kind, data):
        if kind == "step" and data["index"] == 2:
            answers.append(client.post(f"/api/jobs/{job}/stop").json())

    events = read_events(client, job, stop_at_third_preview)
    kind, stopped = events[-1]
    assert kind == "stopped"
    steps_at_stop = answers[0]["steps_at_stop"]
    assert steps_at_stop < stopped["steps_done"] + 1 and stopped["steps_done"] <= steps_at_stop + 1
    assert stopped["steps_done"] < 150 and stopped["total"] == 150
    assert len([e for e in events if e[0] == "step"]) == stopped["steps_done"]
    (image,) = stopped["images"]
    assert pixels(client, image["url"]).shape == (128, 128, 3)  # the latents so far, decoded
    item = next(i for i in client.get("/api/outputs").json()["outputs"] if i["name"] == image["name"])
    assert item["stopped"] and item["steps_done"] == stopped["steps_done"] and item["total_steps"] == 150
    again = client.post(f"/api/jobs/{job}/stop")
    assert again.status_code == 200 and again.json()["state"] == "stopped"  # stopping twice is harmless


def test_queue_positions_and_concurrent_jobs_kept_apart(client):
    long_job = submit(client, steps=150, seed=1)
    wait_for_step(client, long_job, 1)  # running: the next jobs must wait behind it
    first = submit(client, steps=4, seed=21, prompt="a blue square on a black background")
    second = submit(client, steps=4, seed=22, prompt="a yellow triangle on a gray background")
    dropped = submit(client, steps=4, seed=23)
    status = client.get("/api/status").json()
    assert status["running"]["job"] == long_job and status["queue"] == [first, second, dropped]
    assert [client.get(f"/api/jobs/{j}").json()["position"] for j in (first, second, dropped)] == [0, 1, 2]

    # A queued job that is stopped leaves the queue at once, with no image; the others move up.
    client.post(f"/api/jobs/{dropped}/stop")
    assert read_events(client, dropped)[-1] == ("stopped", {
        "job": dropped, "images": [], "steps_done": 0, "total": 4, "seed": 23,
        "settings": client.get(f"/api/jobs/{dropped}").json()["settings"]})

    streams = {}
    threads = [threading.Thread(target=lambda j=j: streams.__setitem__(j, read_events(client, j)))
               for j in (first, second)]
    for thread in threads:
        thread.start()
    client.post(f"/api/jobs/{long_job}/stop")
    for thread in threads:
        thread.join(60)
    for job in (first, second):
        events = streams[job]
        assert all(data["job"] == job for _, data in events)  # nothing of the other job
        assert [d["index"] for k, d in events if k == "step"] == [0, 1, 2, 3]
        assert events[-1][0] == "done"
    queued = [d["position"] for k, d in streams[second] if k == "queued"]
    assert queued[0] == 1 and queued[-1] == 0  # it moved up when the long job finished
    previews = [[d["preview"] for k, d in streams[j] if k == "step"] for j in (first, second)]
    assert not set(previews[0]) & set(previews[1])
    images = [streams[j][-1][1]["images"][0]["url"] for j in (first, second)]
    assert not np.array_equal(pixels(client, images[0]), pixels(client, images[1]))


def test_two_clients_at_once_each_get_their_own_result(client):
    results = {}

    def run(seed):
        job = submit(client, steps=3, seed=seed)
        results[seed] = (job, read_events(client, job))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (31, 32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    (job_a, events_a), (job_b, events_b) = results[31], results[32]
    assert job_a != job_b
    for job, events, seed in ((job_a, events_a, 31), (job_b, events_b, 32)):
        assert {data["job"] for _, data in events} == {job}
        assert events[-1][0] == "done" and events[-1][1]["seed"] == seed


def test_every_registered_scheduler_runs(client):
    from diffloom.registry import registry

    samplers = [name for name in registry.names("scheduler") if name != "DDIMInverseScheduler"]
    assert client.get("/api/schedulers").json()["schedulers"] == samplers
    jobs = {name: submit(client, steps=4, scheduler=name) for name in samplers}
    for name, job in jobs.items():
        kind, data = read_events(client, job)[-1]
        assert kind == "done" and data["settings"]["scheduler"] == name, (name, data)


def test_a_failing_job_reports_its_error_and_the_queue_goes_on(client, engine, monkeypatch):
    def broken(job):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(engine, "_generate", broken)
    kind, data = read_events(client, submit(client, steps=2))[-1]
    assert kind == "error" and data["message"] == "RuntimeError: the model fell over"
    monkeypatch.undo()
    assert read_events(client, submit(client, steps=2))[-1][0] == "done"


# -- the gallery and reproduction ------------------------------------------------------------------------------


def test_gallery_reads_back_settings_and_they_reproduce_the_image(client):
    settings = {"prompt": "a green square on a gray background", "negative_prompt": "blurry", "steps": 6,
                "guidance": 3.5, "scheduler": "EulerDiscreteScheduler", "seed": 123, "width": 96, "height": 128,
                "num_images": 2}
    job = submit(client, **settings)
    done = read_events(client, job)[-1][1]
    names = [image["name"] for image in done["images"]]
    gallery = {item["name"]: item for item in client.get("/api/outputs").json()["outputs"]}
    for index, name in enumerate(names):
        item = gallery[name]
        assert item["settings"] == settings and item["index"] == index and item["image_seed"] == 123 + index
        assert item["model"] == "shapes-128" and not item["stopped"] and item["url"] == f"/outputs/{name}"
    with Image.open(io.BytesIO(client.get(f"/outputs/{names[1]}").content)) as png:
        assert json.loads(png.text["diffloom"])["settings"] == settings
        assert png.text["parameters"] == ("a green square on a gray background\nNegative prompt: blurry\n"
                                          "Steps: 6, Sampler: EulerDiscreteScheduler, CFG scale: 3.5, Seed: 124, "
                                          "Size: 96x128, Model: shapes-128")
        assert png.size == (96, 128)
    newest_first = [item["name"] for item in client.get("/api/outputs").json()["outputs"]]
    assert newest_first == sorted(newest_first, reverse=True)

    # "Use these settings": the gallery's settings, sent back as they are, make the same pixels.
    again = read_events(client, submit(client, **gallery[names[1]]["settings"]))[-1][1]
    for before, after in zip(done["images"], again["images"]):
        assert np.array_equal(pixels(client, before["url"]), pixels(client, after["url"]))


# -- refusals ------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"steps": 0}, 422, "steps"), ({"steps": 151}, 422, "steps"), ({"steps": "5"}, 422, "steps"),
    ({"steps": 2.5}, 422, "steps"), ({"steps": True}, 422, "steps"), ({"steps": None}, 422, "steps"),
    ({"guidance": -1}, 422, "guidance"), ({"guidance": 30.5}, 422, "guidance"),
    ({"guidance": "high"}, 422, "guidance"), ({"guidance": float("nan")}, 422, "guidance"),
    ({"width": 100}, 422, "width"), ({"width": 2048}, 422, "width"), ({"height": 32}, 422, "height"),
    ({"height": [128]}, 422, "height"),
    ({"num_images": 0}, 422, "num_images"), ({"num_images": 5}, 422, "num_images"),
    ({"seed": -1}, 422, "seed"), ({"seed": 2 ** 32}, 422, "seed"), ({"seed": "abc"}, 422, "seed"),
    ({"prompt": "x" * 1001}, 422, "prompt"), ({"prompt": 5}, 422, "prompt"), ({"prompt": None}, 422, "prompt"),
    ({"negative_prompt": {"a": 1}}, 422, "negative_prompt"),
    ({"scheduler": "NoSuchScheduler"}, 400, "scheduler"), ({"scheduler": 3}, 422, "scheduler"),
    ({"custom_pipeline": "someone/evil"}, 422, "custom_pipeline"),
    ({"trust_remote_code": True}, 422, "trust_remote_code"),
    ({"model": "/etc"}, 422, "model"),
]


@pytest.mark.parametrize("change, status, field", BAD_SETTINGS,
                         ids=[f"{f}={json.dumps(c[f])[:12]}" for c, _, f in BAD_SETTINGS])
def test_bad_settings_are_refused_naming_the_field(client, change, status, field):
    response = client.post("/api/generate", content=json.dumps({"prompt": PROMPT, **change}),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and field in body["error"]


def test_refusal_messages_say_what_would_be_accepted(client):
    body = client.post("/api/generate", json={"prompt": PROMPT, "scheduler": "Eulr"}).json()
    assert all(name in body["error"] for name in ("EulerDiscreteScheduler", "DDIMScheduler", "LCMScheduler"))
    body = client.post("/api/generate", json={"prompt": PROMPT, "width": 100}).json()
    assert "multiple of 8" in body["error"] and "96" in body["error"]
    body = client.post("/api/generate", json={"steps": 4}).json()
    assert body["field"] == "prompt" and "missing" in body["error"]


@pytest.mark.parametrize("body, headers, status", [
    (b"{not json", {"Content-Type": "application/json"}, 400),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400),
    (b"\xff\xfe", {"Content-Type": "application/json"}, 400),
    (json.dumps({"prompt": PROMPT}).encode(), {"Content-Type": "text/plain"}, 415),
    (json.dumps({"prompt": PROMPT}).encode(), {}, 415),
    (json.dumps({"prompt": "x" * 70000}).encode(), {"Content-Type": "application/json"}, 413),
], ids=["malformed", "array", "not-utf8", "text-plain", "no-type", "too-large"])
def test_bad_bodies_are_refused(client, body, headers, status):
    response = client.post("/api/generate", content=body, headers=headers)
    assert response.status_code == status and response.json()["error"]


def test_unknown_jobs_and_routes_are_404_json(client):
    for url in ("/api/jobs/0123456789abcdef0123456789abcdef", "/api/jobs/nonsense/events", "/api/jobs/..%2F/stop",
                "/api/nothing"):
        method = client.post if url.endswith("/stop") else client.get
        response = method(url)
        assert response.status_code == 404 and response.json()["error"], url
    response = client.get("/api/generate")
    assert response.status_code == 405 and "GET" in response.json()["error"]


def test_only_images_the_server_wrote_are_served(client, engine, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    outputs = engine.outputs
    plain = "20200101-000000-aaaaaaaaaaaa-0.png"  # the right shape, but no diffloom metadata
    Image.new("RGB", (8, 8)).save(outputs / plain)
    link = "20200101-000000-bbbbbbbbbbbb-0.png"
    os.symlink(secret, outputs / link)
    (outputs / "notes.txt").write_text("not an image")
    try:
        for name, status in [("..%2Fsecret.png", 404), ("%2E%2E%2Fsecret.png", 404), ("notes.txt", 400),
                             ("..png", 400), (".20200101-000000-aaaaaaaaaaaa-0.png.partial", 400),
                             ("20200101-000000-cccccccccccc-0.png", 404), (plain, 404), (link, 404)]:
            response = client.get(f"/outputs/{name}")
            assert response.status_code == status, name
            assert response.headers["content-type"] == "application/json"
        listed = {item["name"] for item in client.get("/api/outputs").json()["outputs"]}
        assert plain not in listed and link not in listed
    finally:
        for name in (plain, link, "notes.txt"):
            (outputs / name).unlink()


def test_the_server_keeps_working_after_refusals(client):
    for change, _, _ in BAD_SETTINGS:
        client.post("/api/generate", content=json.dumps({"prompt": PROMPT, **change}),
                    headers={"Content-Type": "application/json"})
    assert read_events(client, submit(client, steps=2))[-1][0] == "done"


def test_schedulers_status_and_page(client):
    from diffloom.registry import registry

    listed = client.get("/api/schedulers").json()
    assert set(registry.names("scheduler")) - set(listed["schedulers"]) == {"DDIMInverseScheduler"}
    assert listed["default"] in listed["schedulers"]
    status = client.get("/api/status").json()
    assert status["model"] == "shapes-128" and status["defaults"]["width"] == 128
    assert status["defaults"]["steps"] == 20 and status["defaults"]["guidance"] == 2.0
    assert status["limits"]["steps"] == [1, 150] and status["limits"]["num_images"] == [1, 4]
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_trusted_hosts_keep_rebound_names_out(engine):
    with TestClient(create_app(engine, trusted_hosts=["127.0.0.1", "localhost"]),
                    base_url="http://127.0.0.1:7860") as local:
        assert local.get("/api/status").status_code == 200
        assert local.get("/api/status", headers={"Host": "evil.example:7860"}).status_code == 400


# -- the preview colours ---------------------------------------------------------------------------------------


def test_fitted_preview_map_beats_the_sd_table_on_this_vae(engine):
    """Previews of real final latents against the decoded images, both at latent resolution (in 0..255)."""
    from diffloom import DPMSolverMultistepScheduler
    from diffloom_hooks.previews import LATENT_RGB, fit_latent_rgb, latents_to_rgb

    pipe = engine.pipe
    assert engine.fit_seconds < 2.0
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # the model's own sampler
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in
               itertools.product(("red", "blue", "yellow"), ("circle", "square"), ("white", "black", "gray"))]
    latents = pipe(prompts, num_inference_steps=20, guidance_scale=2.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    truth = ((torch.nn.functional.avg_pool2d(decoded, 8) + 1) * 127.5).permute(0, 2, 3, 1).numpy()

    def errors(rgb_map):
        previews = np.stack([np.asarray(latents_to_rgb(z, rgb_map=rgb_map)) for z in latents]).astype(float)
        per_pixel = np.abs(previews - truth).mean()
        per_image = np.abs(previews.mean((1, 2)) - truth.mean((1, 2))).mean()
        return per_pixel, per_image

    fitted = errors(engine.rgb_map)
    table = errors(LATENT_RGB["sd"])
    print(f"preview colour error (0..255), per pixel / per image mean colour: fitted {fitted[0]:.1f} / "
          f"{fitted[1]:.1f}, SD table {table[0]:.1f} / {table[1]:.1f}")
    assert fitted[0] < 0.85 * table[0] and fitted[1] < table[1]
    assert np.allclose(np.asarray(fit_latent_rgb(pipe.vae)[0]), np.asarray(engine.rgb_map[0]))  # seeded
    weights, bias = engine.rgb_map
    assert np.asarray(weights).shape == (4, 3) and np.asarray(bias).shape == (3,)
    assert all(math.isfinite(w) for row in weights for w in row)


def test_fitted_map_recovers_a_linear_decoder():
    """On a VAE whose decoder really is linear per latent pixel, the fit finds its map exactly."""
    from diffloom_hooks.previews import fit_latent_rgb

    true_weights = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.4, -0.3], [0.2, 0.2, 0.6], [-0.1, 0.3, 0.0]])
    true_bias = torch.tensor([0.1, -0.05, 0.2])

    class Config(dict):
        __getattr__ = dict.get

    class LinearVAE(torch.nn.Module):
        config = Config(latent_channels=4, block_out_channels=[1, 1, 1, 1], scaling_factor=0.5)

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z):
            rgb = torch.einsum("nchw,cr->nrhw", z * 0.5, true_weights) + true_bias.view(1, 3, 1, 1)
            return type("Out", (), {"sample": torch.nn.functional.interpolate(rgb, scale_factor=8)})

    weights, bias = fit_latent_rgb(LinearVAE())
    assert torch.allclose(torch.tensor(weights), true_weights, atol=1e-5)
    assert torch.allclose(torch.tensor(bias), true_bias, atol=1e-5)


# -- other models ----------------------------------------------------------------------------------------------


def test_any_sd_style_folder_serves_with_its_own_defaults(tiny_sd_path, tmp_path):
    tiny = Engine.load(str(tiny_sd_path), tmp_path)
    try:
        assert (tiny.defaults["height"], tiny.defaults["width"]) == tiny.pipe.default_height_width(None, None)
        assert tiny.defaults["scheduler"] == type(tiny.pipe.scheduler).__name__
        assert np.asarray(tiny.rgb_map[0]).shape == (4, 3)
        with TestClient(create_app(tiny)) as local:
            job = local.post("/api/generate", json={"prompt": "a photo of a cat", "steps": 3}).json()["job"]
            events = read_events(local, job)
            kind, done = events[-1]
            assert kind == "done" and done["steps_done"] == done["total"]  # PNDM's warm-up runs extra steps
            assert [d["index"] for k, d in events if k == "step"] == list(range(done["total"]))
            item = local.get("/api/outputs").json()["outputs"][0]
            assert item["model"] == str(tiny_sd_path) and item["settings"]["width"] == tiny.defaults["width"]
    finally:
        tiny.close()


def test_a_model_that_is_not_text_to_image_is_refused(tiny_ddpm_path, tmp_path):
    from diffloom.cli import UsageError

    with pytest.raises(UsageError, match="not a text-to-image pipeline"):
        Engine.load(str(tiny_ddpm_path), tmp_path)


# -- the command -----------------------------------------------------------------------------------------------


def test_listing_plugins_imports_neither_torch_nor_the_web_stack():
    code = ("import sys, diffloom_serve; from diffloom.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'starlette', 'uvicorn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    result = subprocess.run([sys.executable, "-m", "diffloom", "--help"], capture_output=True, text=True, timeout=60)
    assert "serve" in result.stdout


def test_a_missing_extra_names_the_install_command():
    code = ("import sys; sys.modules['uvicorn'] = None; from diffloom.cli import main; "
            "sys.exit(main(['serve']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'pip install "diffloom[serve]"' in result.stderr and "uvicorn" in result.stderr
