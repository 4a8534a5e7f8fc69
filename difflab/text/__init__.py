"""Text conditioning: a frozen prompt encoder (optional extra ``difflab[text]``), a Stable
Diffusion folder's CLIP encoder, and new tokens with learned embeddings (textual
inversion)."""

from .clip import CLIPPromptEncoder, is_clip_folder
from .encoder import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderUnavailable, resolve_encoder
from .tokens import TokenEncoder

__all__ = ["DEFAULT_TEXT_ENCODER", "CLIPPromptEncoder", "TextEncoder", "TextEncoderUnavailable",
           "TokenEncoder", "is_clip_folder", "resolve_encoder"]
