"""Thin model definitions: layers plus a `loss(batch) -> dict` that calls the ops.
The trainer, not the model, owns the loop."""

from aefast.models.sparse import SparseAutoencoder

__all__ = ["SparseAutoencoder"]
