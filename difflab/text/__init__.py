"""Text conditioning: a frozen prompt encoder (optional extra ``difflab[text]``)."""

from .encoder import DEFAULT_TEXT_ENCODER, TextEncoder, TextEncoderUnavailable, resolve_encoder

__all__ = ["DEFAULT_TEXT_ENCODER", "TextEncoder", "TextEncoderUnavailable", "resolve_encoder"]
