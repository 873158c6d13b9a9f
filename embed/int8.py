"""int8 on the CPU: torch's dynamic int8 Linear layers, attention projections included."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # torch's CPU int8 GEMM back-ends, preferred first


def int8_engine() -> str:
    """The quantized engine int8 runs on here (x86 / fbgemm on x86-64 with AVX2, qnnpack on ARM).

    Raises
    ------
    ValueError
        When this torch build has no int8 CPU kernels for this CPU.
    """
    engines = supported_engines()
    supported = [e for e in INT8_ENGINES if e in engines]
    if not supported:
        raise ValueError(f"this CPU has no int8 kernels in this torch build (quantized engines: "
                         f"{', '.join(engines) or 'none'}); use --precision fp32.")
    if torch.backends.quantized.engine not in supported:
        torch.backends.quantized.engine = supported[0]
    return torch.backends.quantized.engine


def supported_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


class SelfAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` (equal q/k/v widths) rebuilt from plain ``nn.Linear`` projections.

    The same arithmetic, but its input projection is an ``nn.Linear`` that dynamic quantization turns
    int8 (``nn.MultiheadAttention`` keeps it as a bare parameter, a quarter of a transformer's
    weights). Takes the calls open_clip and timm make: ``(q, k, v, need_weights=False, attn_mask=...)``.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads, self.batch_first, self.embed_dim = mha.num_heads, mha.batch_first, d
        self.in_proj = torch.nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = torch.nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **kwargs):
        if need_weights:
            raise ValueError("int8 attention returns no attention weights (need_weights=True)")
        same = query is key and key is value
        if query.dim() == 2:  # unbatched (L, E), as nn.MultiheadAttention takes it
            out, _ = self.forward(*(t.unsqueeze(1 - int(self.batch_first)) for t in (query, key, value)),
                                  key_padding_mask=None if key_padding_mask is None else key_padding_mask[None],
                                  attn_mask=attn_mask)
            return out.squeeze(1 - int(self.batch_first)), None
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, d = query.shape
        h = self.num_heads
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # cross attention: each input through its third of the projection
            q = self.in_proj(query)[..., :d]
            k = self.in_proj(key)[..., d:2 * d]
            v = self.in_proj(value)[..., 2 * d:]
        q, k, v = (t.reshape(n, t.shape[1], h, d // h).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, n, h, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive_mask(attn_mask, key_padding_mask, dtype, n, h, keys):
    """``nn.MultiheadAttention``'s masks (bool: True = masked out; float: added) as one additive mask."""

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:  # (L, S), or (n * heads, L, S)
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.view(n, h, *mask.shape[1:])
    if key_padding_mask is not None:  # (n, S)
        padding = additive(key_padding_mask).view(n, 1, 1, keys)
        mask = padding if mask is None else mask + padding
    return mask


def quantize_int8(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` with its self-attention and every ``nn.Linear`` made torch's dynamic int8 ones.

    Weights become int8 (one scale per tensor); activations are quantized per batch at run time, so
    there is nothing to calibrate. Convolutions, norms and the attention products stay fp32. The
    fastest of the int8 paths measured here that keeps cosine >= 0.995 to fp32 (bench/int8_backends.py).

    The model is changed in place (no second copy of the weights).
    Linear layers of open_clip's ``AttentionPool2d`` (the ResNet CLIPs' pooling, which reads its
    projections' weights directly) stay fp32.

    Raises
    ------
    ValueError
        For a model whose image path has (almost) no Linear weights (a CNN such as effnet-lite0):
        int8 would change nothing there.
    """
    int8_engine()
    image_path = model.trunk if hasattr(model, "trunk") else getattr(model, "visual", model)
    # open_clip's AttentionPool2d reads its projections' weights itself: they stay fp32
    kept = {id(m) for pool in model.modules() if type(pool).__name__ == "AttentionPool2d" for m in pool.modules()}
    skip = kept | {id(m) for m in _classifiers(image_path)}  # a backbone's ImageNet classifier: not on the path
    total = sum(p.numel() for p in image_path.parameters())
    modules = list(image_path.modules())
    linear = sum(m.weight.numel() for m in modules if isinstance(m, torch.nn.Linear) and id(m) not in skip)
    linear += sum(m.in_proj_weight.numel() for m in modules
                  if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None and id(m) not in skip)
    if linear < 0.25 * total:
        raise ValueError(f"--precision int8 makes the Linear layers of a model int8, and {name} has "
                         f"{linear / max(total, 1):.0%} of its image weights in Linear layers (a convolutional "
                         "network): int8 would not make it faster. Use --precision fp32 for it.")
    _replace_attention(model)
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in kept}
    with warnings.catch_warnings():  # torch marks its eager int8 API as moving to torchao; it is what runs here
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    for m in quantized.modules():  # open_clip reads its cast dtype off a Linear weight, which int8 ones lack
        for method in ("get_cast_dtype", "get_weight_dtype"):
            if callable(getattr(type(m), method, None)):
                setattr(m, method, _float32)
    return quantized


def _float32() -> torch.dtype:
    return torch.float32


def _replace_attention(module: torch.nn.Module) -> None:
    for child_name, child in module.named_children():
        if (isinstance(child, torch.nn.MultiheadAttention) and child._qkv_same_embed_dim and child.bias_k is None
                and child.bias_v is None and not child.add_zero_attn):
            setattr(module, child_name, SelfAttention(child))
        else:
            _replace_attention(child)


def _classifiers(module: torch.nn.Module) -> list[torch.nn.Module]:
    get = getattr(module, "get_classifier", None)
    head = get() if callable(get) else None
    return [head] if isinstance(head, torch.nn.Module) else []
