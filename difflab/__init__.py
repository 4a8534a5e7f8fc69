"""difflab: diffusion models end to end on PyTorch.

Layers (imports point down): process -> parameterization -> networks -> objectives -> samplers ->
training -> cli. See the README for a tour.
"""

__version__ = "0.1.0"
