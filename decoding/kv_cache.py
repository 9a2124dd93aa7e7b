"""Preallocated key/value cache for one sequence (batch 1), pure tensors.

Layout: ``k`` and ``v`` are ``[n_layers, 1, n_kv_heads, max_len, head_dim]``; ``k[i, 0]`` is
layer ``i``'s ``[n_kv_heads, max_len, head_dim]`` block, and ``k[i][:, :, :n]`` is already the
``[1, heads, n, head_dim]`` shape scaled_dot_product_attention takes, with no copy.

Slots ``[0, length)`` are valid. A forward writes its T new entries at ``[length, length + T)``
and advances ``length``. Speculative decoding then either drops rejected entries with
``crop`` (O(1)) or, after verifying a token tree, keeps the accepted path with ``compact``,
which moves only the entries that change slot.

Invariant the model relies on: when a forward starts, slot ``i < length`` holds the key of
RoPE position ``i`` (a committed, linear sequence). ``compact`` of an accepted root-to-leaf
path written at ``positions = start + depth`` restores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class KVCache:
    """Preallocated per-layer K/V for one sequence (batch 1)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, val in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim), ("max_len", max_len)):
            if int(val) <= 0:
                raise ValueError(f"KVCache: {name} must be positive, got {val}")
        self.n_layers, self.n_kv_heads, self.head_dim = int(n_layers), int(n_kv_heads), int(head_dim)
        self.max_len = int(max_len)
        shape = (self.n_layers, 1, self.n_kv_heads, self.max_len, self.head_dim)
        with torch.inference_mode(False):  # ordinary tensors: writable in and out of inference mode
            self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)
            self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.length: int = 0
        # A linearized model's sums over whole committed groups (actors.linear_attention.LinearState),
        # checkpointed by slot; forgotten past the new length whenever entries are dropped.
        self.linear = None

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free(self) -> int:
        """Slots still writable."""
        return self.max_len - self.length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"KVCache(length={self.length}, max_len={self.max_len}, layers={self.n_layers}, "
                f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device})")

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s full ``[n_kv_heads, max_len, head_dim]`` K and V blocks (views)."""
        return self.k[i, 0], self.v[i, 0]

    def check_room(self, n: int) -> None:
        """Raise ValueError unless ``n`` more entries fit."""
        if n < 0:
            raise ValueError(f"KVCache: cannot write a negative number of entries ({n})")
        if self.length + n > self.max_len:
            raise ValueError(
                f"KVCache overflow: writing {n} entries at length {self.length} exceeds "
                f"max_len={self.max_len}; allocate a larger cache or crop/compact first")

    def reset(self) -> None:
        self.length = 0
        self._dropped()

    def _dropped(self) -> None:
        if self.linear is not None:
            self.linear.forget_after(self.length)

    def crop(self, length: int) -> None:
        """Forget every entry at slot >= ``length`` (O(1), nothing is copied)."""
        length = int(length)
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length {length} outside [0, {self.length}]")
        self.length = length
        self._dropped()

    def compact(self, start: int, keep: Sequence[int] | Tensor) -> None:
        """Keep the entries at slots ``start + keep[j]``, moved to ``start + j``.

        ``keep`` is strictly increasing (e.g. the tree slots of an accepted path, in
        topological order). Afterwards ``length == start + len(keep)``. Only entries whose
        slot changes are copied (all layers at once, one gather), never the whole cache.
        """
        start = int(start)
        if isinstance(keep, Tensor):
            keep = keep.reshape(-1).tolist()
        keep = [int(s) for s in keep]
        if not 0 <= start <= self.length:
            raise ValueError(f"KVCache.compact: start {start} outside [0, {self.length}]")
        prev = -1
        for s in keep:
            if s <= prev:
                raise ValueError(f"KVCache.compact: keep must be strictly increasing and >= 0, got {keep}")
            prev = s
        if keep and start + keep[-1] >= self.length:
            raise ValueError(
                f"KVCache.compact: slot start + {keep[-1]} = {start + keep[-1]} is not a valid "
                f"entry (length {self.length})")
        n = len(keep)
        # keep is strictly increasing, so once keep[j] != j every later entry moves too.
        first = next((j for j, s in enumerate(keep) if s != j), n)
        if first < n:
            src = torch.tensor([start + s for s in keep[first:]], dtype=torch.long, device=self.device)
            dst = slice(start + first, start + n)
            with torch.inference_mode():
                # index_select materialises the sources first, so overlapping moves are safe.
                self.k[:, :, :, dst] = self.k.index_select(3, src)
                self.v[:, :, :, dst] = self.v.index_select(3, src)
        self.length = start + n
        if self.linear is not None:
            self.linear.forget_after(start)  # slots from `start` on may have changed
