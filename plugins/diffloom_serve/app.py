"""The ASGI app: the page, its static files, the JSON API and the event streams.

    POST /api/generate            settings (JSON) -> {"job": id, "position": n}        202
    GET  /api/jobs/{id}           the job's state, queue position, step, settings, images
    GET  /api/jobs/{id}/events    server-sent events: queued, started, step, then done / stopped / error
    POST /api/jobs/{id}/stop      stop after the current step (a queued job is dropped)
    GET  /api/status              model, device, running job, queue, defaults, limits
    GET  /api/schedulers          every registered scheduler, and the model's default
    GET  /api/outputs             the gallery: images in the outputs folder with their settings, newest first
    GET  /outputs/{name}          one of those images

Every refusal is a JSON body ``{"error": "...", "field": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import gallery
from .engine import Engine, Job
from .settings import RequestError, parse_body, validate

STATIC = Path(__file__).parent / "static"
_JOB_ID = re.compile(r"[0-9a-f]{32}")
KEEPALIVE_SECONDS = 15.0


def create_app(engine: Engine, trusted_hosts: list[str] | None = None) -> Starlette:
    """The app serving ``engine``. ``trusted_hosts`` limits the Host header a request may carry (a server on
    127.0.0.1 passes its loopback names, so a web page cannot reach it through a rebound DNS name)."""

    def find_job(request: Request) -> Job:
        job_id = request.path_params["job_id"]
        job = engine.job(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise RequestError(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def generate(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/json":
            # Also keeps other web sites out: a cross-site JSON post needs a CORS permission never given here.
            raise RequestError(415, f"send the settings as JSON with Content-Type: application/json (got "
                                    f"{content_type or 'none'})")
        payload = parse_body(await request.body())
        settings = validate(payload, engine.defaults, engine.schedulers, engine.limits)
        job = engine.submit(settings)
        return JSONResponse({"job": job.id, "position": engine.position(job), "seed": job.settings["seed"],
                             "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    async def job_status(request: Request):
        job = find_job(request)
        return JSONResponse(job.summary(engine.position(job)))

    async def stop(request: Request):
        job = find_job(request)
        engine.stop(job)
        return JSONResponse({"job": job.id, "state": job.state, "steps_at_stop": job.steps_at_stop})

    async def events(request: Request):
        job = find_job(request)
        start = 0
        last = request.headers.get("last-event-id", "")
        if last.isdigit():  # a reconnecting EventSource goes on after the last event it saw
            start = int(last) + 1
        return StreamingResponse(_event_stream(job, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def status(request: Request):
        return JSONResponse(engine.status())

    async def schedulers(request: Request):
        return JSONResponse({"schedulers": engine.schedulers, "default": engine.defaults["scheduler"]})

    async def outputs(request: Request):
        return JSONResponse({"outputs": gallery.list_outputs(engine.outputs)})

    async def output_file(request: Request):
        try:
            path = gallery.output_file(engine.outputs, request.path_params["name"])
        except gallery.RefusedName as e:
            raise RequestError(e.status, e.message, "name") from None
        return FileResponse(path, media_type="image/png")

    async def refused(request: Request, error: RequestError):
        return JSONResponse(error.as_dict(), status_code=error.status)

    async def http_error(request: Request, error: HTTPException):
        message = error.detail
        if error.status_code == 404:
            message = f"nothing at {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not accepted at {request.url.path}"
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    routes = [
        Route("/", index),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_status),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/stop", stop, methods=["POST"]),
        Route("/api/status", status),
        Route("/api/schedulers", schedulers),
        Route("/api/outputs", outputs),
        Route("/outputs/{name}", output_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts)] if trusted_hosts else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={RequestError: refused, HTTPException: http_error})


async def _event_stream(job: Job, start: int):
    """The job's events from number ``start`` on, as server-sent events; ends after the job's last event."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    job.listen(loop, wake)
    try:
        sent = start
        while True:
            wake.clear()  # before reading, so an event appended after the read still wakes us
            new, finished = job.events_since(sent)
            for number, (kind, data) in enumerate(new, start=sent):
                yield f"id: {number}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            sent += len(new)
            if finished:
                return
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # a comment line: keeps proxies and idle timeouts from closing the stream
    finally:
        job.unlisten(wake)
