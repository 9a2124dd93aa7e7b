"""decoding.kv_cache.KVCache: crop, compact, bounds."""

from __future__ import annotations

import pytest
import torch

from decoding.kv_cache import KVCache


def _filled(n: int, max_len: int = 16) -> KVCache:
    """Cache whose entry at slot s holds the value s (k) and -s (v) everywhere."""
    c = KVCache(n_layers=3, n_kv_heads=2, head_dim=4, max_len=max_len)
    slots = torch.arange(max_len, dtype=torch.float32)[None, None, None, :, None]
    c.k.copy_(slots.expand_as(c.k))
    c.v.copy_(-slots.expand_as(c.v))
    c.length = n
    return c


def _slot_values(c: KVCache) -> list[int]:
    k = c.k[:, :, :, : c.length]
    assert torch.equal(k, k[:1, :1, :1, :, :1].expand_as(k)), "entries must move as a whole"
    assert torch.equal(c.v[:, :, :, : c.length], -k)
    return [int(x) for x in k[0, 0, 0, :, 0]]


def test_layout():
    c = KVCache(2, 3, 8, 10, dtype=torch.float64)
    assert c.k.shape == c.v.shape == (2, 1, 3, 10, 8)
    assert c.length == 0 and len(c) == 0 and c.max_len == 10 and c.free == 10 and c.dtype == torch.float64
    k0, v0 = c.layer(1)
    assert k0.shape == (3, 10, 8) and k0.data_ptr() == c.k[1].data_ptr()
    with pytest.raises(ValueError):
        KVCache(2, 3, 8, 0)


def test_crop():
    c = _filled(10)
    c.crop(4)
    assert c.length == 4 and _slot_values(c) == [0, 1, 2, 3]
    c.crop(4)
    c.crop(0)
    assert c.length == 0
    with pytest.raises(ValueError):
        c.crop(1)  # cannot grow
    with pytest.raises(ValueError):
        c.crop(-1)


@pytest.mark.parametrize("keep", [[0, 2, 5], [1, 2, 3], [0, 1, 2], [3], [], [0, 1, 4, 6]])
def test_compact_moves_kept_entries(keep):
    c = _filled(12)
    c.compact(5, keep)
    assert c.length == 5 + len(keep)
    assert _slot_values(c) == list(range(5)) + [5 + s for s in keep]


def test_compact_accepts_tensor_and_leaves_the_rest_alone():
    c = _filled(12)
    c.compact(4, torch.tensor([0, 3, 7]))
    assert _slot_values(c) == [0, 1, 2, 3, 4, 7, 11]
    # slots past the new length are not touched (dead entries are never cleared or shifted)
    assert [int(x) for x in c.k[0, 0, 0, 7:12, 0]] == [7, 8, 9, 10, 11]


def test_compact_copies_only_moved_entries(monkeypatch):
    c = _filled(12)
    calls = []
    real = torch.Tensor.index_select

    def spy(self, dim, index):
        calls.append(index.tolist())
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    c.compact(4, [0, 1, 2])  # already in place: nothing to copy
    assert calls == []
    c = _filled(12)
    c.compact(4, [0, 1, 4, 6])
    assert calls == [[8, 10], [8, 10]]  # k and v, only the two moved entries


def test_compact_validation():
    c = _filled(10)
    with pytest.raises(ValueError, match="increasing"):
        c.compact(2, [1, 1])
    with pytest.raises(ValueError, match="increasing"):
        c.compact(2, [3, 2])
    with pytest.raises(ValueError, match="increasing"):
        c.compact(2, [-1, 2])
    with pytest.raises(ValueError, match="valid entry"):
        c.compact(2, [0, 8])  # slot 10 >= length
    with pytest.raises(ValueError, match="start"):
        c.compact(11, [])
    assert c.length == 10 and _slot_values(c) == list(range(10))


def test_check_room():
    c = _filled(6, max_len=8)
    c.check_room(2)
    with pytest.raises(ValueError, match="max_len=8"):
        c.check_room(3)


def test_inference_mode_either_side():
    with torch.inference_mode():
        c = KVCache(1, 1, 2, 8)
        c.k[0, 0, 0, :4] = torch.arange(4.0)[:, None]
        c.length = 4
    c.compact(0, [1, 3])  # outside inference mode on a cache made inside it
    assert c.k[0, 0, 0, :2, 0].tolist() == [1.0, 3.0]
    c.k[0, 0, 0, 2] = 5.0
    with torch.inference_mode():
        c.length = 3
        c.compact(1, [1])
    assert c.length == 2 and c.k[0, 0, 0, 1, 0].item() == 5.0
