"""One new token through a GGUF model in a handful of native calls per layer: the CPU decode fast path.

Why: the torch forward is the reference and the prefill path, but a decode step is dozens of tiny torch calls per layer,
each costing more than its arithmetic (SmolLM2: 140 us of Python and dispatch in a 270 us layer; Nano: 190 us per
layer). `NativeDecoder` runs the same step with one call per stage: RMSNorm, q/k/v products, the attention block (q/k
norm, RoPE, cache write, attention over the bf16 cache), the output product, RMSNorm, then the FFN: a dense one in one
native call (as a MoE layer with one expert), a MoE block in one call that routes and runs its experts, or, offloaded,
in two: the routing, then the experts at the addresses of the slots the host's table gives them (copies on a miss in
between), as the block's module would compute them without its module calls and small tensors (~65 us a layer on Nano).
Traced experts (a hook) keep the module path. Activations and norms are float32 as in the module path (the GGUF
loader's form on the native kernels), so outputs differ from it by summation order only; tests/test_native_decode.py
bounds both against the float32 exact path of the same file.

`decode.decode_step` makes it for a model that qualifies (`NativeDecoder.supports`): on the CPU,
every attention projection and the output matrix on the native kernels, batch 1 at call time. Invariants: no
allocation per step beyond the output logits and the MLP module's own tensors; weights are read where they lie.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels import native
from ..layers.gguf import QLinear
from ..layers.kv_cache import NativeKVCache
from ..models.kv_cache import KVCache


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecoder:
    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.lib = native.library()
        self.H, self.Hkv, self.hd, self.D = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.hidden_size,
        )
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in model.model.layers:
            att = layer.self_attn
            qkv = (att.q_proj, att.k_proj, att.v_proj)
            n = len(qkv)
            self.layers.append(
                {
                    "ln1": layer.input_layernorm.weight.data_ptr(),
                    "ln2": layer.post_attention_layernorm.weight.data_ptr(),
                    "qkv": (
                        (ctypes.c_int * n)(*(int(m.ggml_type) for m in qkv)),
                        (ctypes.c_int64 * n)(*(m.raw.data_ptr() for m in qkv)),
                        (ctypes.c_int64 * n)(*(m.raw.stride(0) for m in qkv)),
                        (ctypes.c_int * n)(*(m.out_features for m in qkv)),
                    ),
                    "q_norm": _ptr(getattr(getattr(att, "q_norm", None), "weight", None)),
                    "k_norm": _ptr(getattr(getattr(att, "k_norm", None), "weight", None)),
                    "o": att.o_proj,
                    "mlp": layer.mlp,
                    "dense": self._dense_mlp(layer.mlp),
                    "moe": self._fused_moe(layer.mlp),
                }
            )
        self.final_norm = model.model.norm.weight.data_ptr()
        self.lm_head: QLinear = model.lm_head
        qkv_size = (self.H + 2 * self.Hkv) * self.hd
        self.x = torch.zeros(self.D)  # the residual stream
        self.h = torch.zeros(self.D)
        self.qkv = torch.zeros(qkv_size)
        self.att = torch.zeros(self.H * self.hd)
        self.tmp = torch.zeros(self.D)
        self.one = torch.ones(1)  # the routing weight of a dense FFN
        self.y = torch.zeros(self.D)  # a MoE block's output
        top_k = max((getattr(layer.mlp, "top_k", 1) for layer in model.model.layers), default=1)
        self.ids, self.weights = torch.zeros(top_k, dtype=torch.int32), torch.zeros(top_k)

    @staticmethod
    def _dense_mlp(mlp: nn.Module) -> tuple | None:
        """A dense SwiGLU FFN on native linears, as the arguments of `marco_moe` with one expert of weight 1 (the
        dense FFN is a MoE layer whose one expert every token uses); None for a MoE block or another FFN."""
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, QLinear) and m.native for m in parts):
            return None
        g, u, d = parts
        ptrs = tuple((ctypes.c_int64 * 1)(m.raw.data_ptr()) for m in parts)
        return (*ptrs, int(g.ggml_type), int(u.ggml_type), int(d.ggml_type), g.out_features)

    @staticmethod
    def _fused_moe(mlp: nn.Module) -> tuple | None:
        """A MoE block whose token path is one `marco_moe_routed` call (`NativeMoeBlock.forward`'s fused case): its
        experts module, then the call's arguments from the router to the types, called here directly (the module
        call, its checks and five small tensors cost ~40 us a layer). None otherwise."""
        from ..layers.gguf import NativeMoeBlock, QExperts

        if not isinstance(mlp, NativeMoeBlock):
            return None
        ex, w = mlp.experts, mlp.gate.weight
        if not (isinstance(ex, QExperts) and ex.native and ex.raws is not None and not ex.in_file):
            return None
        if w.dtype not in (torch.bfloat16, torch.float32):
            return None
        g, u, d = ex.raws
        args = (
            w.data_ptr(), int(w.dtype == torch.float32), w.shape[0], mlp.top_k, int(mlp.norm_topk_prob), 0,
            g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), d.data_ptr(), d.stride(0), *map(int, ex.types),
        )  # fmt: skip
        return ex, mlp, args, ex.intermediate

    def _fused_applies(self, fused: tuple) -> bool:
        """The fused call still stands for the block: its experts not replaced (an offload installed after load),
        not observed, and the block's own routing (not one replaced on the instance)."""
        ex, mlp = fused[0], fused[1]
        return mlp.experts is ex and not self._observed(ex) and "route" not in vars(mlp)

    def _moe(self, fused: tuple, nt: int) -> None:
        """`NativeMoeBlock.forward` on the normed residual `self.h` (float32, as the module gets it), its output added
        onto the residual `self.x`."""
        _, _, args, inter = fused
        code = self.lib.marco_moe_routed(
            self.h.data_ptr(), *args, self.D, inter, self.y.data_ptr(), self.ids.data_ptr(), self.weights.data_ptr(), nt
        )
        native._check(code)
        self.x.add_(self.y)

    @staticmethod
    def _split_moe(mlp: nn.Module) -> tuple | None:
        """A native MoE block computed in two calls, `marco_route` then `marco_moe` on its experts' addresses, for
        what the fused call cannot take: offloaded experts (the host's slot table places them between the calls)
        and a routing replaced on the block (a bench's synthetic trace). Returns (the experts module as installed,
        the offload wrapper or None, the router's arguments, the raws' (address, stride) pairs, the types, the
        width); None for a block that is not native."""
        from ..layers.gguf import NativeMoeBlock, QExperts
        from ..offload.experts import OffloadedExperts

        if not isinstance(mlp, NativeMoeBlock):
            return None
        off = mlp.experts if isinstance(mlp.experts, OffloadedExperts) else None
        inner = off.inner if off is not None else mlp.experts
        w = mlp.gate.weight
        if not (isinstance(inner, QExperts) and inner.native and inner.raws is not None):
            return None
        if (off is None and inner.in_file) or w.dtype not in (torch.bfloat16, torch.float32):
            return None
        E, D = w.shape
        router = (w.data_ptr(), int(w.dtype == torch.float32), E, D, mlp.top_k, int(mlp.norm_topk_prob), 0)
        raws = tuple((r.data_ptr(), r.stride(0)) for r in inner.raws)  # an offload's slots: bound once, never moved
        return mlp.experts, off, router, raws, tuple(map(int, inner.types)), inner.intermediate

    def _split(self, L: dict) -> tuple | None:
        """The layer's `_split_moe`, made again when its experts module changed (an offload installed after load)."""
        split = L.get("split")
        if split is None or split[0] is not L["mlp"].experts:
            split = self._split_moe(L["mlp"]) or (L["mlp"].experts,)
            L["split"] = split
        return split if len(split) > 1 else None

    def _routed_moe(self, split: tuple, mlp: nn.Module, nt: int) -> bool:
        """The block's routing, its experts placed (offloaded: `slots_for_token`, copies included) and computed in
        one `marco_moe` call, added onto the residual as the module path adds it. False when the module path must run
        instead: a hook on the experts (a trace recorder), misses computed on the CPU, fewer slots than a token's
        experts."""
        ex, off, router, raws, types, inter = split
        if self._observed(ex) or (off is not None and (self._observed(off.inner) or off.lru is not None)):
            return False
        k = router[4]
        if off is not None and (off.misses_on_cpu or off.table.num_slots < k):
            return False
        if "route" in vars(mlp):  # replaced on the instance: its ids and weights
            ids, weights = mlp.route(self.h.view(1, -1))
            self.ids[:k].copy_(ids.view(-1))
            self.weights[:k].copy_(weights.view(-1))
        else:
            ids, weights = self.ids.data_ptr(), self.weights.data_ptr()
            native._check(self.lib.marco_route(self.h.data_ptr(), *router, ids, weights, nt))
        row = self.ids[:k].tolist()
        slots = off.slots_for_token(row, self.h.view(1, -1)) if off is not None else row
        arrays = [(ctypes.c_int64 * k)(*(base + s * stride for s in slots)) for base, stride in raws]
        code = self.lib.marco_moe(
            k, *arrays, self.weights.data_ptr(), *types, self.D, inter, self.h.data_ptr(), self.y.data_ptr(), nt
        )
        native._check(code)
        self.x.add_(self.y)
        return True

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """On the CPU, every projection and the output matrix a native `QLinear`, norms in float32 (the GGUF loader's
        form when the native kernels run: activations in float32, KV cache in bf16)."""
        norm = getattr(getattr(model, "model", None), "norm", None)
        if norm is None or not native.available() or norm.weight.dtype != torch.float32:
            return False
        if model.model.norm.weight.device.type != "cpu":
            return False
        linears = [model.lm_head]
        for layer in model.model.layers:
            a = layer.self_attn
            linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        return all(isinstance(m, QLinear) and m.native and not m.exact for m in linears)

    def _matmul(self, lin: QLinear, x: torch.Tensor, y: torch.Tensor) -> None:
        code = self.lib.marco_matmul(
            int(lin.ggml_type), lin.raw.data_ptr(), lin.raw.stride(0), lin.out_features, lin.in_features,
            x.data_ptr(), 1, y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        native._check(code)

    @staticmethod
    def _observed(experts: nn.Module) -> bool:
        """A hook on the experts (a trace recorder) must see every call: the module path then."""
        return bool(experts._forward_hooks or experts._forward_pre_hooks)

    def accepts(self, cache: KVCache) -> bool:
        return isinstance(cache, NativeKVCache)

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [1, 1] at position cache.offset -> float32 logits [1, 1, V]; advances the cache."""
        lib, nt, D, eps = self.lib, torch.get_num_threads(), self.D, self.eps
        pos = cache.offset
        if pos >= cache.max_len:
            cache.update(0, cache.keys[0, :, :, :1], cache.values[0, :, :, :1])  # raises the context-full error
        x, h, qkv, att, tmp = self.x, self.h, self.qkv, self.att, self.tmp
        dtype = self.model.model.norm.weight.dtype
        x.copy_(self.model.model.embed_tokens(tokens).view(D))
        cos, sin = self.model.rotary(pos, 1, torch.float32, x.device)
        head_stride = cache.keys.stride(2)
        f16 = int(cache.keys.dtype == torch.float16)  # else bf16 (`accepts`)
        # layer i's keys/values ([1, Hkv, T, hd] at [i, 0]) by address, not by indexing a view per layer
        keys, values = cache.keys.data_ptr(), cache.values.data_ptr()
        key_bytes = cache.keys.stride(0) * cache.keys.element_size()
        value_bytes = cache.values.stride(0) * cache.values.element_size()
        for i, L in enumerate(self.layers):
            lib.marco_rms_norm(x.data_ptr(), L["ln1"], D, eps, h.data_ptr())
            native._check(lib.marco_matmul_multi(3, *L["qkv"], D, h.data_ptr(), qkv.data_ptr(), nt))
            code = lib.marco_attn_decode(
                qkv.data_ptr(), self.H, self.Hkv, self.hd, L["q_norm"], L["k_norm"], eps, cos.data_ptr(),
                sin.data_ptr(), keys + i * key_bytes, values + i * value_bytes, head_stride, pos, f16,
                att.data_ptr(), nt,
            )  # fmt: skip
            native._check(code)
            self._matmul(L["o"], att, tmp)
            x.add_(tmp)
            lib.marco_rms_norm(x.data_ptr(), L["ln2"], D, eps, h.data_ptr())
            if L["dense"] is not None:
                g, u, d, gt, ut, dt, inter = L["dense"]
                code = lib.marco_moe(
                    1, g, u, d, self.one.data_ptr(), gt, ut, dt, D, inter, h.data_ptr(), tmp.data_ptr(), nt
                )
                native._check(code)
                x.add_(tmp)
            elif (fused := L["moe"]) and self._fused_applies(fused):
                self._moe(fused, nt)
            elif not ((split := self._split(L)) and self._routed_moe(split, L["mlp"], nt)):
                x.add_(L["mlp"](h.to(dtype).view(1, 1, D)).view(D))
        cache.advance(1)
        lib.marco_rms_norm(x.data_ptr(), self.final_norm, D, eps, h.data_ptr())
        logits = torch.empty(self.lm_head.out_features)
        self._matmul(self.lm_head, h, logits)
        return logits.view(1, 1, -1)
