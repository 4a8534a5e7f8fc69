"""Editing with any trained model: SDEdit, inpainting, inversion, interpolation, variations.

All of it drives the same samplers and denoisers as plain sampling: an edit chooses a start
time, a start point, a mask or a path through the grid.
"""

from .inpaint import check_mask, inpaint, latent_mask, load_mask, repaint_path
from .interpolation import interpolate, interpolate_coarse_to_fine, slerp
from .inversion import METHODS, ddim_invert, ode_invert, reconstruct
from .sdedit import sdedit, truncated_grid, variations

__all__ = ["METHODS", "check_mask", "ddim_invert", "inpaint", "interpolate",
           "interpolate_coarse_to_fine", "latent_mask", "load_mask", "ode_invert", "reconstruct",
           "repaint_path", "sdedit", "slerp", "truncated_grid", "variations"]
