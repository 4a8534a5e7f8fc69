"""The public inference API: a saved model as a typed model card plus weights, ready to sample.

- :mod:`.card`: :class:`ModelCard` / :class:`StageCard`, the JSON model card (and the
  conversion of training checkpoints to it).
- :mod:`.loading`: pipeline folders and checkpoints -> networks; noisy classifiers.
- :mod:`.autoencoder`: an autoencoder stage from a run, a pipeline or a diffusers folder.
- :mod:`.conditions`: class labels and prompts -> one condition per image.
- :mod:`.pipeline`: :class:`Pipeline` (``from_pretrained``, ``save_pretrained``, ``denoiser``,
  ``pipe(...)``).
- :mod:`.output`: :class:`PipelineOutput` (tensors, uint8 images, PNG grid, .npz).
"""

from .autoencoder import load_autoencoder
from .card import CARD_FILE, CARD_FORMAT, ModelCard, StageCard
from .conditions import Conditions, class_index
from .loading import LoadedClassifier, load_classifier, load_extractor
from .output import PipelineOutput
from .pipeline import Pipeline, resolve_sampler

__all__ = ["CARD_FILE", "CARD_FORMAT", "Conditions", "LoadedClassifier", "ModelCard",
           "Pipeline", "PipelineOutput", "StageCard", "class_index", "load_autoencoder",
           "load_classifier", "load_extractor", "resolve_sampler"]
