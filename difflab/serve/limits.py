"""What a client of ``difflab serve`` may ask for: the bounds every request is checked against."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ServeLimits:
    """Upper bounds of one request and of the server's memory.

    ``max_upload_bytes`` bounds a whole request body (Flask's ``MAX_CONTENT_LENGTH``: larger
    bodies get HTTP 413 before they are read); ``max_image_side`` bounds an uploaded image's
    width and height, read from its header before any pixel is decoded (a small file can
    declare a huge image); ``max_count`` and ``max_steps`` bound the work of one job;
    ``max_queue`` the jobs waiting behind the running one; ``keep_jobs`` the finished jobs
    whose images are kept in memory (the oldest are dropped)."""

    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_side: int = 4096
    max_count: int = 16
    max_steps: int = 500
    max_guidance: float = 50.0
    max_prompt_chars: int = 300
    max_queue: int = 8
    keep_jobs: int = 32

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
