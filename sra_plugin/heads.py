"""Projection heads on the student side."""

from __future__ import annotations

from torch import nn

__all__ = ["MLPHead", "build_head", "HEADS"]

HEADS = ("mlp", "linear", "identity")


class MLPHead(nn.Sequential):
    """SRA's projection head: ``Linear(D, D + D_t) -> SiLU -> Linear(D + D_t, D_t)``.

    Paper, Sec. 3.2: "the student's representation is passed through a lightweight trainable
    projection head" before it is aligned with the teacher's.
    """

    def __init__(self, dim: int, target_dim: int) -> None:
        hidden = dim + target_dim
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, target_dim))


def build_head(head: str | nn.Module, dim: int, target_dim: int) -> nn.Module:
    """The head named by ``head`` (``"mlp"``, ``"linear"``, ``"identity"``) or the module itself."""
    if isinstance(head, nn.Module):
        return head
    if head == "mlp":
        return MLPHead(dim, target_dim)
    if head == "linear":
        return nn.Linear(dim, target_dim)
    if head == "identity":
        if dim != target_dim:
            raise ValueError(f"head='identity' needs equal widths, but student D={dim} and teacher D={target_dim}: use 'mlp' or 'linear'")
        return nn.Identity()
    raise ValueError(f"head={head!r} is not accepted: use one of {', '.join(map(repr, HEADS))} or an nn.Module")
