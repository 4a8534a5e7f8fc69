"""The Flask app of ``difflab serve``: a page, a JSON API and the job queue.

Routes (all answers JSON except the page, its static files and the PNGs):

- ``GET /``: the page (``static/index.html``; plain HTML/JS, nothing loaded from elsewhere).
- ``GET /api/info``: the models (by index and name, no paths), samplers, modes and limits.
- ``POST /api/preview``: an uploaded image as the model will see it (a PNG data URL), or a
  400 with the reason (the page shows it before any job is queued).
- ``POST /api/jobs``: a form (and ``image``/``mask`` uploads) -> 202 and the job's id; 400
  for a bad field, 413 for a body over the upload limit, 429 when the queue is full.
- ``GET /api/jobs/ID``: status, progress, image URLs, settings.
- ``GET /api/jobs/ID/I.png`` and ``/api/jobs/ID/settings.json``: downloads.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..samplers import SAMPLERS
from .images import png_bytes, png_images, read_image
from .jobs import Job, JobQueue, QueueFull
from .limits import ServeLimits
from .models import ServedModel
from .requests import MODES, parse_request, pick_model
from .work import run_request

STATIC = Path(__file__).parent / "static"
#: the page runs only its own script and shows only its own and generated images
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "object-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def _uploads() -> dict[str, bytes]:
    return {name: f.read() for name, f in request.files.items() if name in ("image", "mask")}


def create_app(models: Sequence[ServedModel], limits: ServeLimits | None = None,
               trusted_hosts: list[str] | None = None) -> Flask:
    """The app over ``models`` (from :func:`~difflab.serve.models.load_models`).

    ``trusted_hosts``: the Host header values accepted (Flask's ``TRUSTED_HOSTS``; a server on
    the loopback address passes :data:`LOOPBACK_HOSTS`, which stops a web page from reaching
    it through DNS rebinding); None accepts any. ``app.extensions["difflab_jobs"]`` is the
    :class:`~difflab.serve.jobs.JobQueue` (its worker thread starts here)."""
    limits = limits or ServeLimits()
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=limits.max_upload_bytes, TRUSTED_HOSTS=trusted_hosts)
    app.json.sort_keys = False  # settings in the order they are written
    jobs = JobQueue(limits.max_queue, limits.keep_jobs)
    app.extensions["difflab_jobs"] = jobs

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.update(SECURITY_HEADERS)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Any:
        if e.code == 413:
            mib = limits.max_upload_bytes / 2**20
            return _error(f"the upload is too large: at most {mib:g} MiB", 413)
        return _error(f"{e.name}: {e.description}", e.code or 500)

    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/info")
    def info() -> Response:
        return jsonify({"version": __version__, "modes": list(MODES),
                        "samplers": sorted(SAMPLERS), "limits": limits.to_dict(),
                        "models": [m.info(i) for i, m in enumerate(models)]})

    @app.post("/api/preview")
    def preview() -> Any:
        try:
            model = models[pick_model(request.form.get("model", "0"), models)]
            data = _uploads().get("image")
            if data is None:
                raise ValueError("no image uploaded")
            c, h, _ = model.pipe.image_shape
            png = png_bytes(read_image(data, c, h, limits))
        except ValueError as e:
            return _error(str(e), 400)
        return jsonify({"image": "data:image/png;base64," + base64.b64encode(png).decode(),
                        "width": model.pipe.image_shape[2],
                        "height": model.pipe.image_shape[1]})

    @app.post("/api/jobs")
    def submit() -> Any:
        try:
            req = parse_request(request.form, _uploads(), models, limits)
        except ValueError as e:
            return _error(str(e), 400)
        model = models[req.model]

        def work(job: Job) -> list[bytes]:
            return png_images(run_request(req, model, job.progress))

        job = Job(work=work, settings=req.settings(model))
        try:
            ahead = jobs.submit(job)
        except QueueFull as e:
            return _error(str(e), 429)
        return jsonify({"id": job.id, "ahead": ahead, "url": f"/api/jobs/{job.id}"}), 202

    def _job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise _NotFound(f"no job {job_id[:40]!r} (unknown, or dropped after "
                            f"{limits.keep_jobs} newer jobs)")
        return job

    @app.get("/api/jobs/<job_id>")
    def status(job_id: str) -> Any:
        return jsonify(_job(job_id).to_dict())

    @app.get("/api/jobs/<job_id>/<int:index>.png")
    def image(job_id: str, index: int) -> Any:
        job = _job(job_id)
        if not 0 <= index < len(job.images):
            raise _NotFound(f"job {job_id} has no image {index}")
        name = f"difflab_{job_id[:8]}_{job.settings['seeds'][index]}.png"
        return Response(job.images[index], mimetype="image/png", headers={
            "Content-Disposition": f'inline; filename="{name}"'})

    @app.get("/api/jobs/<job_id>/settings.json")
    def settings(job_id: str) -> Any:
        resp = jsonify(_job(job_id).settings)
        resp.headers["Content-Disposition"] = f'attachment; filename="difflab_{job_id[:8]}.json"'
        return resp

    return app


class _NotFound(HTTPException):
    code = 404
    name = "Not Found"
