"""The generating side of the server: one pipeline, one worker thread, a first-in first-out queue of jobs.

A job is one generate request. It owns its event list (queued, started, step, done / stopped / error), which
any number of listeners read from the start, so a page that connects late still sees every preview; the
events of one job are only ever appended to that job, so no request sees another's previews.

A job's pipeline call gets two per-call hooks: the shared :class:`LatentPreview` (its target appends a step
event) and :class:`_JobHook`, which counts steps and, once the job was asked to stop, sets *that call's*
interrupt flag: the pipeline finishes the step it is in, skips the rest and decodes the latents it has. Other
calls never see the flag (it lives in the call's state, not on the pipeline).
"""

from __future__ import annotations

import base64
import io
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path

from diffloom import hookimpl

from . import gallery
from .settings import RequestError, limits

logger = logging.getLogger("diffloom.serve")

MAX_QUEUED = 16  # jobs waiting; more is refused with 429 rather than piling up work nobody waits for
MAX_KEPT = 16  # finished jobs whose events (previews included) stay readable
FINISHED = ("done", "stopped", "error")


class Job:
    def __init__(self, settings: dict):
        self.id = uuid.uuid4().hex
        self.settings = settings
        self.state = "queued"
        self.step = 0  # steps finished
        self.total = settings["steps"]  # steps the loop runs (a second-order scheduler runs more)
        self.stop_requested = False
        self.steps_at_stop = None  # steps finished when the stop arrived
        self.images: list[dict] = []
        self._events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._listeners: list = []  # (event loop, asyncio.Event) of each open event stream

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def emit(self, kind: str, data: dict, final_state: str | None = None):
        with self._lock:
            if final_state is not None:
                self.state = final_state  # with the event, so a reader never sees the state without it
            self._events.append((kind, data))
            listeners = list(self._listeners)
        for loop, wake in listeners:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that stream's event loop has closed
                self.unlisten(wake)

    def events_since(self, start: int) -> tuple[list[tuple[str, dict]], bool]:
        """The events from number ``start`` on, and whether the job has finished (its last event among them)."""
        with self._lock:
            return self._events[start:], self.state in FINISHED

    def listen(self, loop, wake):
        with self._lock:
            self._listeners.append((loop, wake))

    def unlisten(self, wake):
        with self._lock:
            self._listeners = [(loop, w) for loop, w in self._listeners if w is not wake]

    def summary(self, position: int | None) -> dict:
        return {"job": self.id, "state": self.state, "position": position, "step": self.step, "total": self.total,
                "settings": self.settings, "images": self.images}


class _JobHook:
    """Per-call hook of one job: counts the steps and turns a stop request into the call's interrupt."""

    def __init__(self, job: Job):
        self.job = job

    @hookimpl
    def on_step_begin(self, pipe, call, step):
        self.job.total = call.num_timesteps

    @hookimpl
    def on_step_end(self, pipe, call, step):
        self.job.step = step.index + 1
        if self.job.stop_requested:
            call.interrupt = True

    def preview(self, index: int, image):
        self.job.emit("step", {"job": self.job.id, "index": index, "total": self.job.total,
                               "preview": png_data_url(image)})


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Engine:
    """Runs generate jobs on ``pipe``, one at a time, and writes the results into ``outputs``."""

    def __init__(self, pipe, outputs: Path, model_name: str, sampling_defaults: dict | None = None):
        from diffloom.registry import registry
        from diffloom_hooks.previews import fit_latent_rgb

        sampling_defaults = sampling_defaults or {}
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)  # the page shows progress; a terminal bar per job is noise
        self.outputs = Path(outputs)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        # Samplers only: an inverting scheduler (DDIM inversion) turns images into noise.
        self.schedulers = [name for name in registry.names("scheduler")
                           if not getattr(registry.get("scheduler", name), "inverts", False)]
        self._scheduler_config = pipe.scheduler.config
        self._scheduler_objects = {type(pipe.scheduler).__name__: pipe.scheduler}
        self.size_factor = getattr(pipe, "vae_scale_factor", 8)
        height, width = pipe.default_height_width(None, None)
        self.defaults = {
            "prompt": "", "negative_prompt": "",
            "steps": sampling_defaults.get("num_inference_steps", 30),
            "guidance": float(sampling_defaults.get("guidance_scale", 7.5)),
            "scheduler": sampling_defaults.get("scheduler", type(pipe.scheduler).__name__),
            "seed": None, "width": width, "height": height, "num_images": 1,
        }
        self.limits = limits((width, height), self.size_factor)

        # The preview colours of this model's VAE, measured once (the SD table is wrong for most other VAEs).
        started = time.perf_counter()
        self.rgb_map = fit_latent_rgb(pipe.vae) if getattr(pipe, "vae", None) is not None else None
        self.fit_seconds = time.perf_counter() - started

        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="diffloom-serve-worker", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model: str | None, outputs: Path, device: str | None = None, dtype: str | None = None):
        """Load ``model`` (the shipped model when None) the way ``diffloom generate`` does, and check it is a
        text-to-image pipeline this server can drive."""
        import inspect

        from diffloom.cli import UsageError
        from diffloom_faces.models import (DEFAULTS_FILE, default_device, load_pipeline, model_source,
                                           sampling_defaults, scheduler_class)

        source = model_source(model)
        device = device or default_device()
        pipe = load_pipeline(source, dtype or ("float32" if device == "cpu" else "float16"), device)
        needed = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
                  "num_images_per_prompt", "generator", "hooks")
        takes = inspect.signature(type(pipe).__call__).parameters
        missing = [name for name in needed if name not in takes]
        if missing or not hasattr(pipe, "default_height_width"):
            raise UsageError(f"--model {source}: {type(pipe).__name__} is not a text-to-image pipeline that "
                             f"diffloom serve can drive (its call takes no {', '.join(missing) or 'size default'}); "
                             f"give a Stable Diffusion-style text-to-image model folder")
        defaults = sampling_defaults(source)
        if "scheduler" in defaults:  # a stored default nobody provides would refuse every request
            scheduler_class(defaults["scheduler"], label=f"{DEFAULTS_FILE} of {source}: scheduler")
        return cls(pipe, outputs, Path(source).name if model is None else model, defaults)

    # -- the queue -------------------------------------------------------------------------------------------

    def submit(self, settings: dict) -> Job:
        """Queue a job for checked settings (see :func:`settings.validate`); a missing seed is drawn here."""
        settings = dict(settings)
        if settings["seed"] is None:
            settings["seed"] = secrets.randbelow(2 ** 32)
        job = Job(settings)
        with self._cond:
            if self._closed:
                raise RequestError(503, "the server is shutting down")
            if len(self._queue) >= MAX_QUEUED:
                raise RequestError(429, f"{len(self._queue)} jobs are already waiting; try again when one has "
                                        f"finished")
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old_jobs()
            job.emit("queued", {"job": job.id, "position": len(self._queue) - 1})
            self._cond.notify()
        return job

    def job(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """How many jobs wait before ``job`` (None once it left the queue)."""
        with self._cond:
            return self._queue.index(job) if job in self._queue else None

    def stop(self, job: Job):
        """Ask ``job`` to stop: a queued one is dropped, a running one ends after its current step."""
        with self._cond:
            if job.finished or job.stop_requested:
                return
            job.stop_requested = True
            job.steps_at_stop = job.step
            if job in self._queue:
                self._queue.remove(job)
                job.emit("stopped", {"job": job.id, "images": [], "steps_done": 0, "total": job.total,
                                     "seed": job.settings["seed"], "settings": job.settings},
                         final_state="stopped")
                self._announce_positions()

    def status(self) -> dict:
        with self._cond:
            running = self._running
            return {
                "model": self.model_name,
                "device": str(self.pipe.device),
                "running": None if running is None else {"job": running.id, "step": running.step,
                                                          "total": running.total},
                "queue": [job.id for job in self._queue],
                "defaults": self.defaults,
                "limits": self.limits,
            }

    def close(self, timeout: float = 10.0):
        """Stop taking jobs, stop the running one, and wait for the worker to finish."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            running = self._running
            self._cond.notify_all()
        for job in queued:
            self.stop(job)
        if running is not None:
            self.stop(running)
        self._thread.join(timeout)

    def _forget_old_jobs(self):
        finished = [job_id for job_id, job in self._jobs.items() if job.finished]
        for job_id in finished[:max(0, len(finished) - MAX_KEPT)]:
            del self._jobs[job_id]

    def _announce_positions(self):
        for position, job in enumerate(self._queue):
            job.emit("queued", {"job": job.id, "position": position})

    # -- the worker ------------------------------------------------------------------------------------------

    def _work(self):
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._queue.popleft()
                job.state = "running"
                self._announce_positions()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job):
        s = job.settings
        job.emit("started", {"job": job.id, "total": job.total, "seed": s["seed"], "settings": s})
        try:
            images = self._generate(job)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            steps_done, total = job.step, job.total
            for index, image in enumerate(images):
                metadata = {"settings": s, "index": index, "image_seed": s["seed"] + index, "model": self.model_name,
                            "steps_done": steps_done, "total_steps": total, "stopped": steps_done < total,
                            "job": job.id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                name = gallery.image_name(stamp, job.id, index)
                gallery.save_image(image, self.outputs, name, metadata)
                job.images.append({"name": name, "url": f"/outputs/{name}"})
        except Exception as e:  # the job fails; the server and the queue go on
            logger.exception("job %s failed", job.id)
            job.emit("error", {"job": job.id, "message": f"{type(e).__name__}: {e}"}, final_state="error")
            return
        stopped = job.step < job.total
        job.emit("stopped" if stopped else "done",
                 {"job": job.id, "images": job.images, "steps_done": job.step, "total": job.total, "seed": s["seed"],
                  "settings": s}, final_state="stopped" if stopped else "done")

    def _generate(self, job: Job) -> list:
        import torch

        from diffloom_hooks.previews import LatentPreview

        s = job.settings
        self.pipe.scheduler = self._scheduler(s["scheduler"])
        hook = _JobHook(job)
        preview = LatentPreview(hook.preview, rgb_map=self.rgb_map)
        # One CPU generator per image, as `diffloom generate` does: image k is seed+k's on any device.
        generators = [torch.Generator("cpu").manual_seed(s["seed"] + k) for k in range(s["num_images"])]
        output = self.pipe(prompt=s["prompt"], negative_prompt=s["negative_prompt"],
                           num_inference_steps=s["steps"], guidance_scale=s["guidance"], width=s["width"],
                           height=s["height"], num_images_per_prompt=s["num_images"], generator=generators,
                           hooks=[hook, preview])
        return output.images

    def _scheduler(self, name: str):
        scheduler = self._scheduler_objects.get(name)
        if scheduler is None:
            from diffloom.registry import registry

            scheduler = registry.get("scheduler", name).from_config(self._scheduler_config)
            self._scheduler_objects[name] = scheduler
        return scheduler
