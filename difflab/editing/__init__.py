"""Editing with any trained model: SDEdit, inpainting, inversion, interpolation, variations,
Prompt-to-Prompt and null-text inversion (text models).

All of it drives the same samplers and denoisers as plain sampling: an edit chooses a start
time, a start point, a mask or a path through the grid.
"""

from .inpaint import check_mask, inpaint, latent_mask, load_mask, repaint_path
from .interpolation import interpolate, interpolate_coarse_to_fine, slerp
from .inversion import METHODS, ddim_invert, ode_invert, reconstruct
from .null_text import NullTextGuidance, NullTextInversion, invert_image, null_text_inversion
from .prompt2prompt import PromptToPromptControl, make_control, prompt_to_prompt
from .sdedit import sdedit, truncated_grid, variations

__all__ = ["METHODS", "NullTextGuidance", "NullTextInversion", "PromptToPromptControl",
           "check_mask", "ddim_invert", "inpaint", "interpolate", "interpolate_coarse_to_fine",
           "invert_image", "latent_mask", "load_mask", "make_control", "null_text_inversion",
           "ode_invert", "prompt_to_prompt", "reconstruct", "repaint_path", "sdedit", "slerp",
           "truncated_grid", "variations"]
