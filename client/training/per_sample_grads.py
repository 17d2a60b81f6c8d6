"""Fast per-sample gradients for the layers Opacus handles slowly in MobileFaceNet.

Importing this module registers two grad samplers with Opacus (its registry is global):
- `nn.PReLU`: Opacus has none, so it falls back to functorch per layer, which is slow. The per-sample
  gradient of a channel-wise PReLU weight is sum over positions of backprop * min(input, 0).
- `nn.Conv2d` with groups == channels (depthwise): Opacus' generic conv sampler computes the full
  (out x in*k*k) product per sample and keeps its block diagonal, i.e. `groups` times too much work
  (256x for MobileFaceNet's 3x3 depthwise layers). Here only the diagonal is computed. Other convs go
  to Opacus' own sampler, except 1x1 stride-1 convs, which need no unfold (a batched matmul).
For ghost clipping (the default, see client/training/trainer.py) it also registers per-sample gradient NORM
samplers for Conv2d (Gram-matrix trick for 1x1 convs) and PReLU.
tests/test_trainer_grads.py checks all of them against a per-example autograd loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn
from torch.nn import grad as nn_grad


@register_grad_sampler(nn.PReLU)
def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    x = activations[0].to(backprops.dtype)
    if not layer.weight.requires_grad:
        return {}
    neg = torch.clamp(x, max=0) * backprops
    if layer.weight.numel() == 1:
        return {layer.weight: neg.reshape(len(x), -1).sum(1, keepdim=True)}
    # channel dim is 1; sum over all other non-batch dims
    dims = [d for d in range(2, x.dim())]
    return {layer.weight: neg.sum(dim=dims) if dims else neg}


@register_grad_sampler(nn.Conv2d)
def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
    pointwise = layer.groups == 1 and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
    if not (depthwise or pointwise) or len(activations[0]) == 0 or isinstance(layer.padding, str):
        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)
    n, c = x.shape[:2]
    if pointwise:  # a 1x1 conv is a per-position linear map: no unfold needed
        g = backprops.reshape(n, layer.out_channels, -1)
        ret = {}
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.bmm(g, x.reshape(n, c, -1).transpose(1, 2)).view(n, *layer.weight.shape)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = g.sum(2)
        return ret
    # Depthwise: grad[n, c, i, j] = sum over output positions of g * (input shifted by (i, j)).
    # One strided slice per kernel offset; no unfold (im2col) buffer of k*k copies of the input.
    g = backprops
    ret = {}
    if layer.weight.requires_grad:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        ho, wo = g.shape[2], g.shape[3]
        if ho == wo == 1:  # a global depthwise conv (GDC): the gradient is the input window times g
            w = xp[:, :, : (kh - 1) * dh + 1 : dh, : (kw - 1) * dw + 1 : dw] * g
        else:
            w = torch.empty((n, c, kh, kw), dtype=g.dtype)
            for i in range(kh):
                for j in range(kw):
                    patch = xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                    w[:, :, i, j] = torch.einsum("nchw,nchw->nc", patch, g)
        ret[layer.weight] = w.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum((2, 3))
    return ret


@register_norm_sampler(nn.Conv2d)
def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms for ghost clipping, without materialising the gradients where cheap.

    A 1x1 stride-1 conv's per-sample weight gradient is sum_l g_l a_l^T over positions l, so its squared
    norm is sum_{l,l'} (g_l . g_l')(a_l . a_l'): two L x L Gram matrices instead of a C_out x C_in
    matrix per sample (with L = 1 after the global depthwise conv, just |g| |a|), used when that is
    cheaper (small maps). Other convs: norms of the per-sample gradients above.
    """
    pointwise = layer.groups == 1 and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
    n = len(activations[0])
    positions = backprops[0].numel() // layer.out_channels if n else 0
    # Gram matrices cost L^2 (C_in + C_out) per sample, the gradient C_in C_out L: pick the cheaper.
    gram = pointwise and positions * (layer.in_channels + layer.out_channels) < layer.in_channels * layer.out_channels
    if not gram or n == 0:
        grads = conv2d_grad_sample(layer, activations, backprops)
        return {p: g.reshape(len(g), -1).norm(2, dim=1) for p, g in grads.items()}
    a = activations[0].to(backprops.dtype).reshape(n, layer.in_channels, -1)
    g = backprops.reshape(n, layer.out_channels, -1)
    ret = {}
    if layer.weight.requires_grad:
        if a.shape[2] == 1:
            sq = (g.squeeze(2) ** 2).sum(1) * (a.squeeze(2) ** 2).sum(1)
        else:
            sq = (torch.bmm(g.transpose(1, 2), g) * torch.bmm(a.transpose(1, 2), a)).sum((1, 2))
        ret[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(2).norm(2, dim=1)
    return ret


@register_norm_sampler(nn.PReLU)
def prelu_norm_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    return {
        p: g.reshape(len(g), -1).norm(2, dim=1) for p, g in prelu_grad_sample(layer, activations, backprops).items()
    }


def batch_grad(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor, *, samplers: dict | None = None
) -> dict:
    """Sum over the batch of the per-sample parameter gradients for these backprops.

    With backprops already scaled by each sample's clipping factor this is the clipped sum DP-SGD
    needs ("book-keeping" ghost clipping, Bu et al. 2023): one weight-gradient op per layer instead of a
    second backward pass through the whole tail. Layers without a special case fall back to the
    per-sample sampler, summed.
    """
    x = activations[0].to(backprops.dtype)
    out = {}
    if isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str):
        if layer.weight.requires_grad:
            out[layer.weight] = nn_grad.conv2d_weight(
                x, layer.weight.shape, backprops, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = backprops.sum((0, 2, 3))
        return out
    if isinstance(layer, nn.Linear):
        if layer.weight.requires_grad:
            out[layer.weight] = torch.einsum("n...i,n...j->ij", backprops, x)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = backprops.reshape(-1, backprops.shape[-1]).sum(0)
        return out
    if isinstance(layer, nn.PReLU) and layer.weight.requires_grad:
        neg = torch.clamp(x, max=0) * backprops
        if layer.weight.numel() == 1:
            return {layer.weight: neg.sum().reshape(1)}
        return {layer.weight: neg.sum(dim=[d for d in range(neg.dim()) if d != 1])}
    sampler = (samplers or {}).get(type(layer))
    if sampler is None:
        raise TypeError(f"no per-sample gradient for {type(layer).__name__}")
    return {p: g.sum(0) for p, g in sampler(layer, activations, backprops).items()}
