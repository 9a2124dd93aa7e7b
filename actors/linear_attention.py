"""Linearized attention that speculative decoding can verify (arXiv 2406.07368, SEEDS.md 5).

A linear layer keeps softmax attention inside each query's group of `group` positions
(64) and attends linearly, through learned feature maps on q and k, to every earlier
group; a causal depthwise convolution on V (the seed's augmentation) adds local detail:

    y_i = ( sum_local e^(s_ij - m_i) [v_j, 1]  +  g_h phi_q(q_i) . sum_past phi_k(k_j) [v_j, 1] )
          -> numerator / denominator,  plus  sum_s w_s * v_(i's ancestor s steps up)

`local` are the keys query i sees whose position is in i's group, `past` those before it.
"Sees" is ancestry: in a verify of a token tree a node sees the committed tokens and its
own ancestors, never a sibling branch. Sums over the past and the convolution therefore
run along each node's root-to-node path, written here as masks over the few keys since
the last group boundary, so verifying a tree gives the logits of decoding each of its
paths one token at a time (up to float summation order).

State. The sums over whole committed groups, S = sum phi_k(k) [v, 1]^T per KV head (fp32),
are checkpointed at group boundaries in `LinearState`, which lives on the KV cache. Keys
and values since the boundary stay in the cache's slots as usual. A step reads S at the
boundary below its start plus at most `group - 1` cached slots and its new tokens: its
cost does not grow with the context. Rejected drafts cost nothing (the cache is cropped;
checkpoints past the new length are forgotten); committing a tree path is the KV cache's
`compact`; a group is folded into S once, when a forward first starts past it, in group
order, so S is the same whichever way the tokens arrived.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR_FILE = "linear.safetensors"
LINEAR_CONFIG = "linear.json"


@dataclass(frozen=True)
class LinearConfig:
    group: int = 64  # softmax inside groups of this many positions
    features: int = 64  # phi(x) = [softmax(xW), softmax(-xW)]: 2 * features per head
    conv: int = 4  # depthwise causal convolution on V, this many taps (1 = the token itself)
    layers: tuple[int, ...] = ()  # the linearized layers; () = all

    def __post_init__(self) -> None:
        for name in ("group", "features", "conv"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LinearConfig.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"LinearConfig.layers must be distinct layer indices, got {self.layers}")

    def linear_layers(self, n_layers: int) -> tuple[int, ...]:
        if any(i >= n_layers for i in self.layers):
            raise ValueError(f"linear layers {self.layers} go past the model's {n_layers} layers")
        return self.layers or tuple(range(n_layers))

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> LinearConfig:
        known = {"group", "features", "conv", "layers"}
        return cls(**{k: (tuple(v) if k == "layers" else v) for k, v in d.items() if k in known})


class LinearParams(nn.Module):
    """The parameters a linearized layer adds to a softmax layer: what attention transfer trains."""

    def __init__(self, cfg: LinearConfig, n_heads: int, n_kv: int, head_dim: int) -> None:
        super().__init__()
        self.cfg, self.n_heads, self.n_kv, self.head_dim = cfg, n_heads, n_kv, head_dim
        f = cfg.features
        self.q_map = nn.Parameter(torch.empty(n_heads, head_dim, f))
        self.k_map = nn.Parameter(torch.empty(n_kv, head_dim, f))
        self.q_bias = nn.Parameter(torch.zeros(n_heads, 1, f))
        self.k_bias = nn.Parameter(torch.zeros(n_kv, 1, f))
        self.lin_gain = nn.Parameter(torch.zeros(n_heads))  # g_h = softplus(.): past vs local weight
        self.conv = nn.Parameter(torch.zeros(cfg.conv, n_kv, head_dim))  # starts as no convolution
        self.reset()

    def reset(self) -> None:
        """Initial maps: the identity's first `features` columns, scaled like the attention
        scores (Hedgehog starts from the identity too)."""
        eye = torch.eye(self.head_dim, self.cfg.features) * self.head_dim ** -0.25
        with torch.no_grad():
            self.q_map.copy_(eye.expand_as(self.q_map))
            self.k_map.copy_(eye.expand_as(self.k_map))

    def phi_q(self, q: Tensor) -> Tensor:
        """[H, T, D] -> [H, T, 2f] (fp32)."""
        return _hedgehog(q.float() @ self.q_map.float() + self.q_bias.float())

    def phi_k(self, k: Tensor) -> Tensor:
        """[Hkv, T, D] -> [Hkv, T, 2f] (fp32)."""
        return _hedgehog(k.float() @ self.k_map.float() + self.k_bias.float())

    def gain(self) -> Tensor:
        return F.softplus(self.lin_gain.float())


def _hedgehog(x: Tensor) -> Tensor:
    return torch.cat((torch.softmax(x, -1), torch.softmax(-x, -1)), -1)


# --------------------------------------------------------------------------- one forward


@dataclass
class LinearStep:
    """What every linear layer of one forward shares: which cached slots it reads and how
    each new token sees them. Slots [lo, end) are read; [lo, boundary) only by the
    convolution (they are already summed in S)."""
    boundary: int  # group boundary at or below the forward's start: S covers [0, boundary)
    lo: int
    end: int
    local: Tensor  # bool [T, L]: softmax keys (seen, in the query's group)
    past: Tensor  # bool [T, L]: linear keys (seen, earlier group, not in S)
    taps: Tensor  # float [conv, T, L]: one-hot, the ancestor s positions up (zero row: none)
    any_past: bool  # False for a step inside its group: only S and the local keys count


def ancestry(start: int, lo: int, positions: Tensor, tree_mask: Tensor | None) -> Tensor:
    """bool [T, end - lo]: which slots each new token sees. Committed slots all; new tokens
    by `tree_mask` (default causal). Verifying a tree against a flattened causal order
    instead would mix sibling branches (what the tests' mutation does)."""
    T = positions.shape[0]
    new = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    seen = torch.ones(T, start - lo + T, dtype=torch.bool, device=positions.device)
    seen[:, start - lo:] = new
    return seen


def plan_step(cfg: LinearConfig, start: int, positions: Tensor, tree_mask: Tensor | None) -> LinearStep:
    """Masks for T new tokens at `positions` after `start` committed slots."""
    dev, T = positions.device, positions.shape[0]
    boundary = cfg.group * (start // cfg.group)
    lo = max(0, boundary - (cfg.conv - 1))
    end = start + T
    key_pos = torch.cat((torch.arange(lo, start, device=dev), positions))
    seen = ancestry(start, lo, positions, tree_mask)
    own_group = cfg.group * torch.div(positions, cfg.group, rounding_mode="floor")
    attended = seen & (key_pos >= boundary)[None, :]
    local = attended & (key_pos[None, :] >= own_group[:, None])
    past = attended & ~local
    dist = positions[:, None] - key_pos[None, :]  # [T, L]
    taps = torch.stack([(seen & (dist == s)).float() for s in range(cfg.conv)])
    return LinearStep(boundary, lo, end, local, past, taps, bool(past.any()))


def attend(p: LinearParams, q: Tensor, k_slots: Tensor, v_slots: Tensor, step: LinearStep, sums: Tensor,
           scale: float) -> Tensor:
    """Linearized attention of T queries [H, T, D] over slots [lo, end) ([Hkv, L, D], new tokens
    included) and the committed sums; -> [H, T, D] fp32. Differentiable in `p` (training)."""
    H, T, D = q.shape
    n_kv = k_slots.shape[0]
    g = H // n_kv
    k, v = k_slots.float(), v_slots.float()
    v1 = torch.cat((v, torch.ones_like(v[..., :1])), -1)  # the ones column carries the denominator
    qf = q.float().reshape(n_kv, g * T, D)
    local, past = step.local.repeat(g, 1), step.past.repeat(g, 1)
    s = (qf @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~local, -math.inf)
    w_local = torch.exp(s - s.amax(-1, keepdim=True))  # a query always sees itself: amax is finite
    pq = (p.phi_q(q) * p.gain()[:, None, None]).reshape(n_kv, g * T, -1)
    if step.any_past:
        w_local = w_local + (pq @ p.phi_k(k).transpose(-1, -2)) * past
    nd = w_local @ v1 + pq @ sums
    y = (nd[..., :D] / nd[..., D:]).reshape(H, T, D)
    conv = torch.einsum("stl,hld,shd->htd", step.taps, v, p.conv.float())
    return y + conv.repeat_interleave(g, 0)


# --------------------------------------------------------------------------- state


class LinearState:
    """S at recent group boundaries, per linear layer. Lives on a `KVCache` (`cache.linear`),
    which forgets the checkpoints past its length whenever it crops, compacts or resets."""

    KEEP = 4  # boundaries kept: a rollback further back than this refolds from slot 0

    def __init__(self) -> None:
        self.points: dict[int, list[Tensor | None]] = {}

    def forget_after(self, length: int) -> None:
        self.points = {b: s for b, s in self.points.items() if b <= length}

    def copy(self) -> LinearState:
        other = LinearState()
        other.points = dict(self.points)  # checkpoints are never written in place
        return other

    def sums_at(self, boundary: int, group: int, fold, empty) -> list[Tensor | None]:
        """S at `boundary`: from the nearest checkpoint below, folding whole groups in order
        with `fold(sums, lo, hi)`; `empty()` is S over nothing."""
        base = max((b for b in self.points if b <= boundary), default=0)
        sums = self.points.get(base) or empty()
        for lo in range(base, boundary, group):
            sums = fold(sums, lo, lo + group)
        self.points[boundary] = sums
        for b in sorted(self.points)[:-self.KEEP]:
            del self.points[b]
        return sums


def fold_group(params: LinearParams, sums: Tensor, k_slots: Tensor, v_slots: Tensor) -> Tensor:
    """S + phi_k(K)^T [V, 1] for one whole group of slots (a new tensor: checkpoints share)."""
    v = v_slots.float()
    v1 = torch.cat((v, torch.ones_like(v[..., :1])), -1)
    return sums + params.phi_k(k_slots).transpose(-1, -2) @ v1


def empty_sums(params: LinearParams, device: torch.device) -> Tensor:
    return torch.zeros(params.n_kv, 2 * params.cfg.features, params.head_dim + 1, device=device)
