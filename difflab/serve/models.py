"""The models a server offers: the runs named on its command line, loaded once at start-up.

A client chooses a model by its index or its name in :func:`load_models`'s list; nothing a
client sends is ever used as a path, so no file outside those runs can be reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..pipeline import Pipeline


@dataclass
class ServedModel:
    """One run offered by the server: its ``name`` (the folder's name, made unique), the
    folder it came from and the loaded :class:`~difflab.pipeline.Pipeline`."""

    name: str
    path: Path
    pipe: Pipeline

    @property
    def conditioning(self) -> str:
        """"text" (prompts), "class" (class labels) or "none" (unconditional)."""
        if self.pipe.is_text:
            return "text"
        return "class" if self.pipe.class_names else "none"

    @property
    def guided(self) -> bool:
        """Whether a guidance scale other than 1 means anything for this model."""
        return self.conditioning != "none" or self.pipe.stage.guidance_input

    def info(self, index: int) -> dict[str, Any]:
        """What the page shows and needs to build its form (no paths)."""
        sampler, steps, _ = self.pipe.default_sampler()
        c, h, w = self.pipe.image_shape
        return {"index": index, "name": self.name, "conditioning": self.conditioning,
                "class_names": self.pipe.class_names, "guided": self.guided,
                "negative_prompt": self.conditioning == "text",
                "channels": c, "height": h, "width": w, "latent": self.pipe.is_latent,
                "default_sampler": sampler, "default_steps": steps}


def _unique_name(path: Path, taken: set[str]) -> str:
    name, k = path.name or "model", 2
    while name in taken:
        name, k = f"{path.name}_{k}", k + 1
    return name


def load_models(runs: Sequence[str | Path], device: torch.device | str = "cpu"
                ) -> list[ServedModel]:
    """Load each run (a run folder, a pipeline folder or a checkpoint, as
    :meth:`Pipeline.from_pretrained` takes) once; a ValueError naming the run for one that
    is not an image model (2-D point models have nothing to show in a browser)."""
    if not runs:
        raise ValueError("give at least one RUN to serve")
    out: list[ServedModel] = []
    for run in runs:
        path = Path(run)
        if not path.exists():
            raise FileNotFoundError(f"RUN does not exist: {run}")
        pipe = Pipeline.from_pretrained(path, device=device)
        if len(pipe.image_shape) != 3:
            raise ValueError(f"{run} is not an image model (its samples have shape "
                             f"{list(pipe.image_shape)}); difflab serve shows images")
        name = _unique_name(path.resolve(), {m.name for m in out})
        out.append(ServedModel(name=name, path=path.resolve(), pipe=pipe))
    return out
