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
    api = _Api(list(models), limits, JobQueue(limits.max_queue, limits.keep_jobs))
    app.extensions["difflab_jobs"] = api.jobs
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, api.http_error)
    app.add_url_rule("/", "index", lambda: send_from_directory(STATIC, "index.html"))
    for rule, view, methods in (
            ("/api/info", api.info, ["GET"]), ("/api/preview", api.preview, ["POST"]),
            ("/api/jobs", api.submit, ["POST"]), ("/api/jobs/<job_id>", api.status, ["GET"]),
            ("/api/jobs/<job_id>/<int:index>.png", api.image, ["GET"]),
            ("/api/jobs/<job_id>/settings.json", api.settings, ["GET"])):
        app.add_url_rule(rule, view.__name__, view, methods=methods)
    return app


def _security_headers(resp: Response) -> Response:
    resp.headers.update(SECURITY_HEADERS)
    return resp


class _NotFound(HTTPException):
    code = 404
    name = "Not Found"


class _Api:
    """The views of the JSON API over ``models``, checked against ``limits``."""

    def __init__(self, models: list[ServedModel], limits: ServeLimits, jobs: JobQueue):
        self.models, self.limits, self.jobs = models, limits, jobs

    def http_error(self, e: HTTPException) -> Any:
        if e.code == 413:
            mib = self.limits.max_upload_bytes / 2**20
            return _error(f"the upload is too large: at most {mib:g} MiB", 413)
        return _error(f"{e.name}: {e.description}", e.code or 500)

    def info(self) -> Response:
        return jsonify({"version": __version__, "modes": list(MODES),
                        "samplers": sorted(SAMPLERS), "limits": self.limits.to_dict(),
                        "models": [m.info(i) for i, m in enumerate(self.models)]})

    def preview(self) -> Any:
        """The uploaded image as the model will see it, as a PNG data URL."""
        try:
            model = self.models[pick_model(request.form.get("model", "0"), self.models)]
            data = _uploads().get("image")
            if data is None:
                raise ValueError("no image uploaded")
            c, h, w = model.pipe.image_shape
            png = png_bytes(read_image(data, c, h, self.limits))
        except ValueError as e:
            return _error(str(e), 400)
        return jsonify({"image": "data:image/png;base64," + base64.b64encode(png).decode(),
                        "width": w, "height": h})

    def submit(self) -> Any:
        """Validate the form and queue its job: 202, or 400 / 429 with the reason."""
        try:
            req = parse_request(request.form, _uploads(), self.models, self.limits)
        except ValueError as e:
            return _error(str(e), 400)
        model = self.models[req.model]

        def work(job: Job) -> list[bytes]:
            return png_images(run_request(req, model, job.progress))

        job = Job(work=work, settings=req.settings(model))
        try:
            ahead = self.jobs.submit(job)
        except QueueFull as e:
            return _error(str(e), 429)
        return jsonify({"id": job.id, "ahead": ahead, "url": f"/api/jobs/{job.id}"}), 202

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise _NotFound(f"no job {job_id[:40]!r} (unknown, or dropped after "
                            f"{self.limits.keep_jobs} newer jobs)")
        return job

    def status(self, job_id: str) -> Any:
        return jsonify(self._job(job_id).to_dict())

    def image(self, job_id: str, index: int) -> Any:
        job = self._job(job_id)
        if not 0 <= index < len(job.images):
            raise _NotFound(f"job {job_id} has no image {index}")
        name = f"difflab_{job_id[:8]}_{job.settings['seeds'][index]}.png"
        return Response(job.images[index], mimetype="image/png", headers={
            "Content-Disposition": f'inline; filename="{name}"'})

    def settings(self, job_id: str) -> Any:
        resp = jsonify(self._job(job_id).settings)
        resp.headers["Content-Disposition"] = f'attachment; filename="difflab_{job_id[:8]}.json"'
        return resp
