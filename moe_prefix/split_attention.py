"""Split attention: softmax over [prefix, tokens] as two parts merged by their log-sum-exp, forward and backward.

Softmax attention over [prefix, tokens] equals the two partial attentions, over the real keys and over the P
prefix keys, merged by their log-sum-exp: L = logaddexp(L_t, L_p), out = e^(L_t - L) out_t + e^(L_p - L) out_p
(the identity ring and cascade attention use). The token part runs on torch's fused kernel exactly as the frozen
model would (flash with `is_causal` and no mask where the padding allows it), the prefix part (biases, length
masks, concat gates) is a small attention of its own. The backward is exact too: the fused kernel's backward,
fed the merged output and log-sum-exp, returns the joint softmax's gradients for the token part, and the prefix
part's follow from exp(s - L).

Plain torch on tensors; `injection` decides when a model's attention call takes this path and builds its mask.

Axes: b - batch, h - heads (key/value heads where g is present), g - query heads per key/value head,
q - query tokens, t - key tokens, p - prefix positions, d - head dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

_aten = torch.ops.aten


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(b h t d) -> (b (h g) t d): each key/value head repeated for the g query heads that read it."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


_aten = torch.ops.aten


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 (fp64 for fp64 models), as the fused kernels keep them."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_kernel(query: Tensor, masked: bool) -> str | None:
    """The log-sum-exp-returning kernel the token part runs on, or None where there is none.

    cpu: `_scaled_dot_product_flash_attention_for_cpu` (takes a mask, grouped-query heads natively).
    CUDA: flash (no mask, half precision, grouped-query heads natively), else memory-efficient (takes a mask).
    """
    d = query.shape[-1]
    if query.device.type == "cpu":
        return "cpu"
    if query.device.type != "cuda" or d % 8 or d > 256:
        return None
    if not masked and query.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "efficient"


def _token_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float):
    """Attention over the real keys: out (b h q d), its log-sum-exp (b h q), what the backward needs."""
    if kernel == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse, ()
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    # memory-efficient: no grouped-query heads on every torch version, so repeat them (as sdpa does with a mask);
    # the bias must be (b h q t), which the cached mask (rows padded to 16 for alignment) expands to as a view.
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    efficient = _aten._scaled_dot_product_efficient_attention
    out, lse, seed, offset = efficient(q, k, v, bias, True, 0.0, causal, scale=scale)
    # its log-sum-exp has its query axis padded to a multiple of 32; the backward wants that shape back
    return out, lse[..., : q.shape[2]], (lse, seed, offset, bias)


def _token_backward(kernel, aux, dout, q, k, v, out, lse, mask, causal, scale):
    """dq, dk, dv of the token part, given the merged output and log-sum-exp of the joint softmax."""
    if kernel == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    if kernel == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
        )
    padded, seed, offset, bias = aux
    padded = padded.clone()
    padded[..., : q.shape[2]] = lse
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _repeat_kv(k, groups), _repeat_kv(v, groups), bias, out, padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale,
    )  # fmt: skip
    # a repeated key/value head collects the gradients of every query head that read it
    return dq, dk.unflatten(1, (k.shape[1], groups)).sum(2), dv.unflatten(1, (k.shape[1], groups)).sum(2)


def _prefix_scores(q: Tensor, prefix_key: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Prefix logits s = q k_p^T * scale + bias, (b h g q p), and the grouped queries (b h g q d), in fp32."""
    acc = _acc_dtype(q.dtype)
    grouped = q.unflatten(1, (prefix_key.shape[1], -1)).to(acc)  # query heads under their key/value head
    scores = torch.einsum("bhgqd,bhpd->bhgqp", grouped, prefix_key.to(acc)) * scale
    if bias is not None:
        # a hard-masked position (-inf) becomes the dtype's min, as in the joint path: rows stay finite
        scores = scores + bias.to(acc).clamp_min(torch.finfo(acc).min)[:, None, None, None, :]
    return scores, grouped


def _split_forward(kernel, q, k, v, prefix_key, prefix_value, bias, mask, causal, scale):
    """Merged output (b q h d) in the query's dtype, the joint log-sum-exp (b h g q), the token kernel's aux."""
    out_t, lse_t, aux = _token_forward(kernel, q, k, v, mask, causal, scale)
    scores, _ = _prefix_scores(q, prefix_key, bias, scale)
    lse_t = lse_t.reshape(scores.shape[:-1]).to(scores.dtype)
    lse = torch.logaddexp(lse_t, scores.logsumexp(-1))
    # softmax over [prefix, tokens] = e^(L_t - L) softmax_t + e^(s_p - L) on the prefix positions
    merged = torch.exp(lse_t - lse)[..., None] * out_t.unflatten(1, lse.shape[1:3]).to(scores.dtype)
    probs = torch.exp(scores - lse[..., None])
    merged = merged + torch.einsum("bhgqp,bhpd->bhgqd", probs, prefix_value.to(scores.dtype))
    out = rearrange(merged, "b h g q d -> b q (h g) d").to(q.dtype, memory_format=torch.contiguous_format)
    return out, lse, aux


class _SplitPrefixAttention(torch.autograd.Function):
    """Exact forward and backward of softmax over [prefix, tokens] with the tokens on a fused kernel."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_key, prefix_value, bias, mask, causal, scale, kernel):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, aux = _split_forward(kernel, q, k, v, prefix_key, prefix_value, bias, mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_key, prefix_value, bias, out, lse)
        ctx.mask, ctx.causal, ctx.scale, ctx.kernel, ctx.aux = mask, causal, scale, kernel, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_key, prefix_value, bias, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dout = dout.contiguous().transpose(1, 2)  # (b h q d) views of (b q h d), the layout the kernels produce
            out = out.transpose(1, 2)
            token_lse = lse.flatten(1, 2).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
            dq, dk, dv = _token_backward(
                ctx.kernel, ctx.aux, dout, q, k, v, out, token_lse.contiguous(), ctx.mask, ctx.causal, ctx.scale
            )
            scores, grouped = _prefix_scores(q, prefix_key, bias, ctx.scale)
            acc = scores.dtype
            probs = torch.exp(scores - lse[..., None])  # the joint softmax on the prefix positions
            dout = dout.unflatten(1, lse.shape[1:3]).to(acc)
            # D = rowsum(dO * O) of the joint softmax: dS = P (dO V^T - D) on every column, prefix ones included
            delta = (dout * out.unflatten(1, lse.shape[1:3]).to(acc)).sum(-1, keepdim=True)
            dscores = probs * (torch.einsum("bhgqd,bhpd->bhgqp", dout, prefix_value.to(acc)) - delta)
            dq_prefix = torch.einsum("bhgqp,bhpd->bhgqd", dscores, prefix_key.to(acc)) * ctx.scale
            dq = (dq.to(acc) + dq_prefix.flatten(1, 2)).to(dq.dtype)  # one rounding to a half-precision dq
            dkey = torch.einsum("bhgqp,bhgqd->bhpd", dscores, grouped) * ctx.scale
            dvalue = torch.einsum("bhgqp,bhgqd->bhpd", probs, dout)
            dbias = None if bias is None else dscores.sum((1, 2, 3)).to(bias.dtype)
        return dq, dk, dv, dkey.to(prefix_key.dtype), dvalue.to(prefix_value.dtype), dbias, None, None, None, None


def split_attention(q, k, v, prefix_key, prefix_value, bias, mask, causal: bool, scale: float, kernel: str) -> Tensor:
    """Softmax attention over [prefix, tokens] as two merged parts; returns (b q h d) like the model's sdpa.

    q (b h q d); k, v (b h t d) with key/value heads; prefix_key, prefix_value (b h p d); bias (b p) or None;
    mask: additive (b|1 1|h q t) in q's dtype (a position bias may vary by head) or None, with `causal` for a
    mask-free causal call.
    """
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, prefix_key, prefix_value, bias)
    )
    if needs_grad:
        return _SplitPrefixAttention.apply(q, k, v, prefix_key, prefix_value, bias, mask, causal, scale, kernel)
    with torch.autocast(q.device.type, enabled=False):
        return _split_forward(kernel, q, k, v, prefix_key, prefix_value, bias, mask, causal, scale)[0]
