"""Projection heads on the student side."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLPHead", "LinearHead", "NotAView", "build_head", "HEADS"]

HEADS = ("mlp", "linear", "identity")


class NotAView:
    """A head whose output is never a view. ``nn.Linear`` on ``(B, T, D)`` returns a view of a 2-D
    product; FSDP2 warns at every step that an in-place op on a view output of a sharded module would
    drop its pre-backward hook (wrong gradients), so the heads the package builds return a fresh tensor."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out.clone() if out._base is not None else out


class MLPHead(NotAView, nn.Sequential):
    """SRA's projection head: ``Linear(D, D + D_t) -> SiLU -> Linear(D + D_t, D_t)``.

    Paper, Sec. 3.2: "the student's representation is passed through a lightweight trainable
    projection head" before it is aligned with the teacher's.
    """

    def __init__(self, dim: int, target_dim: int) -> None:
        hidden = dim + target_dim
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, target_dim))


class LinearHead(NotAView, nn.Linear):
    """``Linear(D, D_t)`` (``head="linear"``), same parameters and state-dict keys as ``nn.Linear``."""


def build_head(head: str | nn.Module, dim: int, target_dim: int) -> nn.Module:
    """The head named by ``head`` (``"mlp"``, ``"linear"``, ``"identity"``) or the module itself."""
    if isinstance(head, nn.Module):
        return head
    if head == "mlp":
        return MLPHead(dim, target_dim)
    if head == "linear":
        return LinearHead(dim, target_dim)
    if head == "identity":
        if dim != target_dim:
            raise ValueError(f"head='identity' needs equal widths, but student D={dim} and teacher D={target_dim}: use 'mlp' or 'linear'")
        return nn.Identity()
    raise ValueError(f"head={head!r} is not accepted: use one of {', '.join(map(repr, HEADS))} or an nn.Module")
