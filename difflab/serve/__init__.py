"""``difflab serve``: a local web app over :mod:`difflab.pipeline`.

- :mod:`.limits`: :class:`ServeLimits`, the sizes and counts a client may ask for.
- :mod:`.models`: :class:`ServedModel`, the runs given on the command line, loaded once and
  chosen by index or name (a client never names a path).
- :mod:`.requests`: a form -> a validated :class:`JobRequest` (a ValueError with a message
  for anything out of range, unknown or non-finite).
- :mod:`.images`: uploads and drawn masks -> tensors, checked before they are decoded;
  images -> PNG bytes.
- :mod:`.work`: one request -> images (sampling, SDEdit, inpainting) with progress.
- :mod:`.jobs`: :class:`JobQueue`, one job at a time on a worker thread.
- :mod:`.app`: :func:`create_app`, the Flask app (needs the ``serve`` extra); the page is
  plain HTML/JS under ``static/`` with no build step and nothing fetched from elsewhere.
"""

from typing import Any

from .limits import ServeLimits
from .models import ServedModel, load_models
from .requests import MODES, JobRequest, parse_request

__all__ = ["MODES", "JobRequest", "ServeLimits", "ServedModel", "create_app", "load_models",
           "parse_request"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """:func:`difflab.serve.app.create_app` (imported on use: Flask is an optional extra)."""
    from .app import create_app as make
    return make(*args, **kwargs)
