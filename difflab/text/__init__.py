"""Text conditioning: a frozen prompt encoder (optional extra ``difflab[text]``) and new
tokens with learned embeddings (textual inversion)."""

from .encoder import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderUnavailable, resolve_encoder
from .tokens import TokenEncoder

__all__ = ["DEFAULT_TEXT_ENCODER", "TextEncoder", "TextEncoderUnavailable", "TokenEncoder",
           "resolve_encoder"]
