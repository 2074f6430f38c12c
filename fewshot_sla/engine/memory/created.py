"""The bytes of the tensors a block of code creates (``CreatedBytes``): an upper bound of the memory it needs at
once, measured rather than estimated, for code whose working memory no formula in the engine knows (a plug-in
learner's head).

Every operation the block runs is seen through a ``TorchDispatchMode``; the sizes of its outputs that do not share
an input's storage (a view, an in-place result) are summed. Nothing is subtracted when a tensor is freed, so the sum
bounds the block's peak from above: exact for a block that frees nothing, loose by the reuse of a block that frees
as it goes. It is a count of tensor sizes, the same on every machine and run for the same shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class CreatedBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """``with CreatedBytes() as created: ...`` then ``created.bytes``: bytes of every tensor the block's operations
    returned in new storage."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and _storage(leaf) not in inputs:
                self.bytes += leaf.numel() * leaf.element_size()
        return out


def _storage(tensor: torch.Tensor) -> int:
    """Where a tensor's storage lies: a view or an in-place result shares its input's."""
    return int(tensor.untyped_storage().data_ptr())
