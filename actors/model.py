"""A compact decoder-only transformer for Qwen2, Llama and Gemma3 (text).

Its config is `actors.model_config`, its layers `actors.layers`, how each forward
attends (masks, RoPE, sparse steps) `actors.attention_plan`, and how an HF model's
weights become ours `actors.hf_weights`; this file holds the module and runs forwards.

``Transformer.from_hf(hf_model)`` wraps the parameters of an already-loaded Hugging Face
model (same tensors, no copy). ``forward`` takes T new tokens for one sequence, appends
their keys/values to a ``KVCache`` and returns float32 logits. With ``positions`` and a
``tree_mask`` it verifies a whole token tree in one pass: each node sees the committed
cache plus the new tokens its mask row allows, at its own RoPE position, which gives the
same logits as feeding that node's root-to-node path as a plain sequence.

Every linear runs the kernel measured fastest on this machine for its shape and row count
(``actors.kernels``; ``tune_kernels``). Grouped-query attention folds the query heads of
one KV group into the query length, so K/V are never expanded.
"""


from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors import kernels
from actors import linear_attention as lin
from actors.attention_plan import BatchItem, Segment, plan_attention, sparse_step
from actors.hf_weights import wrap_hf
from actors.layers import Block, Linear, RMSNorm
from actors.model_config import ModelConfig, rope_inv_freq
from actors.tidal import TidalConfig
from decoding.kv_cache import KVCache


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        """Parameters are allocated uninitialised; use ``from_hf`` to wrap real weights."""
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.quant_embedding: nn.Module | None = None  # a GGUF model's embedding blocks (actors.gguf_model)
        self._row_exact: bool | None = None  # decided on first use, once the linears are final
        self._fused: list | None = None  # native layers (actors.fused), likewise decided on first use
        self._fused_stack = None  # all of them in one call, for row-by-row forwards (actors.fused.FusedStack)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.output = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings
        self._init_buffers()

    def _init_buffers(self, device: torch.device | str | None = None) -> None:
        cfg = self.config
        device = device if device is not None else self.device
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling).to(device),
                             persistent=False)
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        local_scaling = cfg.rope_scaling if cfg.rope_local_theta is None else None
        self.register_buffer("inv_freq_local", rope_inv_freq(local, cfg.head_dim, local_scaling).to(device),
                             persistent=False)
        scale = math.sqrt(cfg.hidden_size) if cfg.gemma else 1.0
        # Gemma scales embeddings by sqrt(hidden) rounded to the embedding dtype, as transformers does.
        self.register_buffer("embed_scale", torch.tensor(scale, device=device).to(self.dtype), persistent=False)

    @property
    def row_exact(self) -> bool:
        """True when every row of a forward is computed as it would be alone: all linears
        run row-independent kernels (the quantized ones), and attention then goes row by
        row. Verifying T tokens then gives bitwise the logits of T one-token steps, so greedy
        speculation equals decoding alone even at near-ties. Dense BLAS kernels change
        their summation order with the row count, so dense models are not row-exact."""
        if self._row_exact is None and self.config.linear is not None:
            self._row_exact = False  # linear layers sum the past in another order when verifying
        if self._row_exact is None:
            linears = [self.output] + [m for blk in self.layers for m in (
                blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.mlp.w_gate, blk.mlp.w_up, blk.mlp.w_down)]
            self._row_exact = all(getattr(m, "row_independent", False) for m in linears)
        return self._row_exact

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (float32 for quantized models)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, hf_model) -> Transformer:
        """Wrap an HF *ForCausalLM's parameters (the very same tensors: zero copy); see
        ``actors.hf_weights``."""
        return wrap_hf(cls, hf_model)

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def tune_kernels(self, threads: int | None = None, progress: bool = False) -> dict[str, list[str]]:
        """Pick each linear's kernel by measurement (cached per CPU); see ``actors.kernels``."""
        return kernels.tune(self.linears(), threads, progress)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, dtype=self.dtype, device=self.device)
        if c.linear is not None:
            cache.linear = lin.LinearState()
        return cache

    def linearize(self, cfg: lin.LinearConfig) -> list[lin.LinearParams]:
        """Turn the layers `cfg` names into linearized attention (actors.linear_attention),
        with fresh feature maps (`loading.load_linear` loads trained ones); returns them.
        Changes `self.config` in place: a model sharing that config object changes too."""
        mc = self.config
        if mc.linear is not None:
            raise ValueError("this model is linearized already")
        if "sliding_attention" in mc.layer_types:
            raise ValueError(f"linearizing {mc.family} models with sliding-window layers is not supported")
        layers = cfg.linear_layers(mc.n_layers)
        added = []
        for i in layers:
            p = lin.LinearParams(cfg, mc.n_heads, mc.n_kv_heads, mc.head_dim).to(self.device)
            self.layers[i].attn.linear = p
            self.layers[i].layer_type = "linear_attention"
            added.append(p)
        mc.layer_types = tuple("linear_attention" if i in layers else t for i, t in enumerate(mc.layer_types))
        mc.linear = cfg
        self._row_exact = None
        return added

    def linear_params(self) -> dict[str, Tensor]:
        """The linearized layers' parameters by name (`layers.I.P`): what a linearized model ships."""
        return {f"layers.{i}.{n}": t for i, blk in enumerate(self.layers) if blk.attn.linear is not None
                for n, t in blk.attn.linear.named_parameters()}

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache, positions: Tensor | None = None,
                tree_mask: Tensor | None = None, last_only: bool = False, sparse: TidalConfig | None = None) -> Tensor:
        """Float32 logits [T, V] ([1, V] with ``last_only``) for T new tokens; see ``forward_hidden``."""
        h = self.forward_hidden(tokens, cache, positions, tree_mask, sparse)
        return self.logits(h[-1:] if last_only else h)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """lm_head (+ final softcapping) on final normed hidden states -> float32 [N, V]."""
        out = self.output(hidden)
        cap = self.config.final_logit_softcapping
        if cap:  # in the model dtype, as transformers does
            out = torch.tanh(out / cap) * cap
        return out.float()

    @torch.inference_mode()
    def forward_hidden(self, tokens: Tensor, cache: KVCache, positions: Tensor | None = None,
                       tree_mask: Tensor | None = None, sparse: TidalConfig | None = None,
                       prefill: bool = False) -> Tensor:
        """Run T new tokens; return the final normed hidden states [T, hidden].

        Writes their K/V at slots [cache.length, cache.length + T) and advances cache.length.
        ``positions`` (long [T]) are the RoPE positions, default cache.length + arange(T).
        ``tree_mask`` (bool [T, T], True = may attend) says which new tokens each new token
        sees, default causal; every new token also sees all of [0, cache.length).
        Sliding-window layers also hide keys with position_q - position_k >= window
        (cache slot i < cache.length is taken to hold position i).
        ``sparse``: TidalDecode attention (``actors.tidal``), an approximation, for forwards
        of at most ``MAX_SPARSE_TOKENS`` tokens over more than ``budget`` cached ones;
        otherwise, and always in its full and selection layers, attention is exact.
        ``prefill``: a chunk of a prompt, attended as one batch even on row-exact models (their
        row-by-row attention is for verifies, which must equal decoding steps; a prompt is
        prefilled the same way whatever decodes after it).
        """
        cfg = self.config
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        seg = self._segment(tokens, cache, positions, tree_mask, sparse, prefill, slice(None))
        x = self._run(tokens, [seg])
        cache.length = seg.start + tokens.shape[0]
        if cfg.linear and prefill:  # a prompt is committed: fold its whole groups now (snapshots keep them)
            self._linear_sums(cache, cfg.linear.group * (cache.length // cfg.linear.group))
        return self.final_norm(x)

    @torch.inference_mode()
    def forward_batch(self, batch: list[BatchItem]) -> list[Tensor]:
        """Several sequences in one forward: each item as ``forward_hidden`` takes it. The
        linears run once over all rows; each sequence attends over its own cache. Returns
        each sequence's final normed hidden states [T_i, hidden]. On a row-exact model every row equals the same
        sequence run alone, bitwise. A linearized model's sums and a sparse step's selection
        are each sequence's own (planned per segment), so they batch like the rest."""
        if not batch:
            raise ValueError("forward_batch needs at least one sequence")
        segs, lo = [], 0
        for it in batch:
            n = it.tokens.numel()
            segs.append(self._segment(it.tokens, it.cache, it.positions, it.tree_mask, it.sparse, it.prefill,
                                      slice(lo, lo + n)))
            lo += n
        x = self._run(torch.cat([it.tokens.reshape(-1) for it in batch]), segs)
        hidden = self.final_norm(x)
        group = self.config.linear.group if self.config.linear else 0
        for it, seg in zip(batch, segs):
            it.cache.length = seg.start + it.tokens.numel()
            if group and it.prefill:  # as `forward_hidden`: a committed prompt chunk folds its whole groups
                self._linear_sums(it.cache, group * (it.cache.length // group))
        return [hidden[seg.rows] for seg in segs]

    def _segment(self, tokens: Tensor, cache: KVCache, positions: Tensor | None, tree_mask: Tensor | None,
                 sparse: TidalConfig | None, prefill: bool, rows: slice) -> Segment:
        """Check one sequence's inputs and plan how it attends (nothing written yet)."""
        cfg = self.config
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty long tensor [T], got shape {tuple(tokens.shape)}")
        if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
            raise ValueError(f"{cache!r} does not fit this model")
        T, start, dev = tokens.shape[0], cache.length, self.device
        cache.check_room(T)
        if positions is not None:
            if positions.shape != (T,):
                raise ValueError(f"positions must have shape [{T}], got {tuple(positions.shape)}")
            positions = positions.to(dev)
        if tree_mask is not None:
            if tree_mask.shape != (T, T):
                raise ValueError(f"tree_mask must have shape [{T}, {T}], got {tuple(tree_mask.shape)}")
            tree_mask = tree_mask.to(device=dev, dtype=torch.bool)
        plans = plan_attention(self, T, start, positions, tree_mask, self.dtype, prefill)
        step = sparse_step(self, sparse, T, start, tree_mask)
        sums = self._linear_sums(cache, plans["linear_attention"].linear.boundary) if cfg.linear else None
        return Segment(rows, cache, start, plans, step, sums)

    def _run(self, tokens: Tensor, segs: list[Segment]) -> Tensor:
        """Embed the new tokens of every segment and run them through all layers."""
        ids = tokens.to(self.device)
        x = self.quant_embedding(ids) if self.quant_embedding is not None else F.embedding(ids, self.tok_embeddings)
        if self.config.gemma:
            x = x * self.embed_scale
        fused = self.fused_layers()
        if fused and self._fused_stack is not None and self._fused_stack.covers(segs):
            return self._fused_stack(x, segs)
        for i, blk in enumerate(fused or self.layers):
            x = blk(x, i, segs)
        return x

    def fused_layers(self) -> list | None:
        """The layers as few native calls each (`actors.fused`) where this model allows, else None."""
        if self._fused is None:
            from actors import fused

            self._fused = [fused.FusedBlock(blk) for blk in self.layers] if fused.applies(self) else []
            self._fused_stack = (fused.FusedStack(self._fused, self.config.intermediate_size)
                                 if self._fused and fused.stacked() else None)
        return self._fused or None

    def final_norm(self, x: Tensor) -> Tensor:
        if self.fused_layers():
            from actors.native import layer as native_layer

            return native_layer.rmsnorm(x, self.norm.weight, self.norm.eps)
        return self.norm(x)

    def _linear_sums(self, cache: KVCache, boundary: int) -> list[Tensor | None]:
        """Each linear layer's S over the committed slots [0, boundary), from the cache's checkpoints."""
        if cache.linear is None:
            raise ValueError("a linearized model needs a cache from its own new_cache()")
        params = [blk.attn.linear for blk in self.layers]

        def empty() -> list[Tensor | None]:
            return [None if p is None else lin.empty_sums(p, self.device) for p in params]

        def fold(sums: list[Tensor | None], lo: int, hi: int) -> list[Tensor | None]:
            return [None if p is None else lin.fold_group(p, s, cache.k[i, 0, :, lo:hi], cache.v[i, 0, :, lo:hi])
                    for i, (p, s) in enumerate(zip(params, sums))]

        return cache.linear.sums_at(boundary, self.config.linear.group, fold, empty)

    def check_sparse(self, sparse: TidalConfig) -> None:
        """Refuse a TidalDecode layout this model cannot run, naming why."""
        cfg = self.config
        if cfg.linear is not None:
            raise ValueError("tidal attention is not supported on a linearized model (its linear layers already "
                             "read a state of fixed size)")
        if "sliding_attention" in cfg.layer_types:
            raise ValueError(f"tidal attention is not supported on {cfg.family} models with sliding-window layers")
        if sparse.select_layers[-1] >= cfg.n_layers:
            raise ValueError(f"tidal selection layer {sparse.select_layers[-1]} is past this model's "
                             f"{cfg.n_layers} layers")
