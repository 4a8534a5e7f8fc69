"""Vector quantisation for the autoencoder's ``regularizer="vq"`` (van den Oord et al. 2017).

Each latent vector z_e (one per pixel of the latent map) is replaced by its nearest codebook
entry e_k, k = argmin_j ||z_e - e_j||^2 (VQ-VAE Eq. 1-2). The gradient skips the
non-differentiable argmin with the straight-through estimator (z_q = z_e + sg[e_k - z_e]),
and the loss (VQ-VAE Eq. 3, without its reconstruction term) is

    ||sg[z_e] - e_k||^2 + beta * ||z_e - sg[e_k]||^2      (codebook + commitment)

averaged over the latent elements of each image.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """A codebook of ``codebook_size`` vectors of width ``dim``; ``forward(z [B, dim, h, w])``
    -> (z_q with straight-through gradient, indices [B, h, w], loss [B])."""

    def __init__(self, codebook_size: int, dim: int, commitment: float = 0.25):
        super().__init__()
        self.commitment = commitment
        self.codebook = nn.Embedding(codebook_size, dim)
        # uniform(-1/K, 1/K), the initialisation of the VQ-VAE reference implementations
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest codebook entry for every latent vector: [B, dim, h, w] ->
        [B, h, w] (int64). ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, minimised over e."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(1).view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of ``indices`` [B, h, w] as a latent map [B, dim, h, w]."""
        return self.codebook(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices = self.nearest(z)
        zq = self.lookup(indices)
        codebook_loss = (zq - z.detach()).pow(2).mean((1, 2, 3))  # moves e towards z_e
        commitment_loss = (z - zq.detach()).pow(2).mean((1, 2, 3))  # keeps z_e near e
        loss = codebook_loss + self.commitment * commitment_loss
        if not z.requires_grad:
            return zq, indices, loss  # exact codebook vectors (z + (z_q - z) may round)
        # straight-through: forward value z_q, gradient d/dz_q passed unchanged to z_e
        return z + (zq - z).detach(), indices, loss
