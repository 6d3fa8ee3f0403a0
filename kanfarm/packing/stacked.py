"""A pack of same-shaped networks as one set of stacked parameters ``(members, *shape)``.

Members share the input batch, so the first layer runs as one wide matrix product (and a KAN's
first-layer B-spline bases, the dominant cost, are computed once for all members); later layers
are batched products over the leading member dimension. Parameter names are the single model's
(``build_model``), so a member's slice is exactly that run's ``state_dict``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kanfarm.models.activations import make_activation
from kanfarm.models.bspline import cox_de_boor_basis, is_uniform
from kanfarm.models.uniform_spline import (bases_for_training, closed_form_applies, fused_kernels_apply,
                                           grid_origin_and_scale, input_grad_from_bases)


def stream_key(config_hash: str) -> int:
    """A member's dropout stream key on the fused path: 60 bits of its config hash."""
    return int(config_hash[:15], 16)


class StackedSpline(torch.autograd.Function):
    """Per-member ``bases(x) @ weight[m].T`` on one uniform grid; ``weight`` is ``(M, out, n_bases*in)``
    in ``(basis, in)`` order. ``x`` is ``(B, in)`` (shared: bases computed once) or ``(M, B, in)``."""

    @staticmethod
    def forward(ctx, x, weight, t0, inv_h, order: int):
        members, out_f, k = weight.shape
        n_bases = k // x.shape[-1]
        flat = x.reshape(-1, x.shape[-1])
        bases, saved = bases_for_training(flat, t0, inv_h, n_bases, order, ctx.needs_input_grad[0])
        ctx.save_for_backward(weight, t0, inv_h, bases, saved)
        ctx.order = order
        ctx.shared = x.dim() == 2
        if ctx.shared:
            out = bases.view(flat.shape[0], k) @ weight.reshape(members * out_f, k).t()
            return out.view(flat.shape[0], members, out_f).transpose(0, 1)
        return torch.bmm(bases.view(members, x.shape[1], k), weight.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weight, t0, inv_h, bases, saved = ctx.saved_tensors
        members, out_f, k = weight.shape
        grad_x = grad_w = None
        if ctx.shared:
            g = grad_out.transpose(0, 1).reshape(-1, members * out_f)  # (B, M*out)
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ bases.view(g.shape[0], k)).view(members, out_f, k)
            if ctx.needs_input_grad[0]:
                grad_x = input_grad_from_bases(g @ weight.reshape(members * out_f, k), saved, t0, inv_h, ctx.order)
        else:
            b = grad_out.shape[1]
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(grad_out.transpose(1, 2), bases.view(members, b, k))
            if ctx.needs_input_grad[0]:
                grad_bases = torch.bmm(grad_out, weight).view(members * b, k)
                grad_x = input_grad_from_bases(grad_bases, saved, t0, inv_h, ctx.order).view(members, b, -1)
        return grad_x, grad_w, None, None, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight[m].T (+ bias[m])`` for every member -> ``(M, B, out)``; shared ``x`` is ``(B, in)``."""
    members, out_f, in_f = weight.shape
    if x.dim() == 2:
        out = (x @ weight.reshape(members * out_f, in_f).t()).view(x.shape[0], members, out_f).transpose(0, 1)
        return out if bias is None else out + bias.unsqueeze(1)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class StackedNet:
    """Stacked parameters of ``templates`` (one built model per member, same architecture).

    ``activations``: per-member activation names; ``dropouts``: per-member dropout p (MLP).
    Buffers (a KAN's knots) are the first template's, one set for all: templates must share them.
    On the CPU, dropout masks come from per-member generators, drawn exactly as ``nn.Dropout``
    draws them, so each member continues the random stream its solo run would use. On CUDA (the
    ``triton_pack`` kernels apply) all members' masks are drawn in one launch from counter-based
    streams keyed by ``dropout_keys`` (one int per member, from its config hash) and the step
    count; a solo run's fused dropout kernel draws other masks anyway, so on CUDA a packed member's
    masks equal its solo run's in distribution, not bit for bit (see benchmarks/RESULTS.md).
    """

    def __init__(self, kind: str, templates: list[nn.Module], activations: list[str], dropouts: list[float],
                 device: torch.device, dropout_keys: list[int] | None = None):
        self.kind = "kan" if kind == "kan" else "mlp"
        self.device = device
        first = templates[0]
        self.names = [n for n, _ in first.named_parameters()]
        self.params: dict[str, torch.Tensor] = OrderedDict()
        for name in self.names:
            stacked = torch.stack([dict(t.named_parameters())[name].detach() for t in templates])
            self.params[name] = stacked.to(device).requires_grad_(True)
        self.buffers = {n: b.to(device) for n, b in first.named_buffers()}
        self.keys = list(first.state_dict().keys())
        self.n_layers = len(first.blocks)
        self.spline_order = first.blocks[0].spline_order if self.kind == "kan" else None
        # grids never move under backprop: decide the fast path once, not with a host sync per step
        self.uniform = {n: is_uniform(b) for n, b in self.buffers.items() if n.endswith(".grid")}
        self.origin_scale = {n: grid_origin_and_scale(self.buffers[n]) for n, uniform in self.uniform.items() if uniform}
        self.activations = list(activations)
        self.dropouts = [float(p) for p in dropouts]
        self.dropout_keys = None if dropout_keys is None else list(dropout_keys)
        first_param = next(iter(self.params.values()))
        self.fused_dropout = self.dropout_keys is not None and fused_kernels_apply(first_param)
        self._segments()

    def _segments(self) -> None:
        """Runs of consecutive members with one activation (members are sorted, so few)."""
        self.segments: list[tuple[int, int, nn.Module]] = []
        for m, name in enumerate(self.activations):
            if self.segments and self.activations[self.segments[-1][0]] == name:
                start, _, act = self.segments[-1]
                self.segments[-1] = (start, m + 1, act)
            else:
                self.segments.append((m, m + 1, make_activation(name)))

    @property
    def size(self) -> int:
        return len(self.activations)

    def keep(self, members: list[int]) -> None:
        """Drop every member not listed (finished or diverged), keeping order."""
        idx = torch.tensor(members, device=self.device)
        for name in self.names:
            self.params[name] = self.params[name].detach().index_select(0, idx).requires_grad_(True)
        self.activations = [self.activations[m] for m in members]
        self.dropouts = [self.dropouts[m] for m in members]
        if self.dropout_keys is not None:
            self.dropout_keys = [self.dropout_keys[m] for m in members]
        self._segments()

    # -- forward ----------------------------------------------------------------------------------

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.segments[0][2](x)
        return torch.cat([act(x[a:b]) for a, b, act in self.segments])

    def _dropout(self, h: torch.Tensor, generators: list[torch.Generator], step: int, layer: int) -> torch.Tensor:
        """As aten's dropout per member: ``bernoulli_(1 - p)`` drawn from that member's generator
        into its slice of one noise tensor, then scaled by ``1 / (1 - p)`` (float32, as ``div_``
        rounds it) in one product for the whole pack; p = 0 leaves the member untouched. On the
        fused path the noise comes from ``triton_pack.dropout_noise`` at (``step``, ``layer``)."""
        if not any(p > 0 for p in self.dropouts):
            return h
        if self.fused_dropout:
            from kanfarm.packing.triton_pack import dropout_noise

            if getattr(self, "_noise_key", None) != (self.dropouts, self.dropout_keys, h.device):
                keep = torch.tensor([1 - p for p in self.dropouts], dtype=torch.float32, device=h.device)
                self._noise_args = (torch.tensor(self.dropout_keys, dtype=torch.int64, device=h.device),
                                    keep, torch.ones_like(keep) / keep)
                self._noise_key = (list(self.dropouts), list(self.dropout_keys), h.device)
            return h * dropout_noise(h, *self._noise_args, step, layer)
        noise = torch.empty_like(h)
        for m, p in enumerate(self.dropouts):
            if p > 0:
                noise[m].bernoulli_(1 - p, generator=generators[m])
            else:
                noise[m].fill_(1.0)
        if getattr(self, "_scale_key", None) != (self.dropouts, h.device, h.dtype):
            keep = torch.tensor([1 - p for p in self.dropouts], dtype=h.dtype, device=h.device)
            self._scale = (torch.ones_like(keep) / keep).view(-1, *([1] * (h.dim() - 1)))
            self._scale_key = (list(self.dropouts), h.device, h.dtype)
        return h * noise.mul_(self._scale)

    def forward(self, x: torch.Tensor, generators: list[torch.Generator] | None = None, step: int = 0) -> torch.Tensor:
        """Logits ``(M, B, classes)`` for the shared batch ``x``; dropout on when ``generators`` given
        (``step``, the updates done so far, places the fused path's masks in their streams)."""
        for i in range(self.n_layers):
            x = self._block(i, x, generators, step)
        return x

    def forward_blocks(self, x: torch.Tensor, generators: list[torch.Generator] | None = None, step: int = 0,
                       hidden_grad: bool = True, output_grad: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The HSIC trainer's forward: every hidden block's output ``(M, B, width)`` and the logits,
        each block fed its input detached (no gradient crosses blocks); autograd records the hidden
        blocks only with ``hidden_grad``, the output block only with ``output_grad``."""
        zs = []
        with torch.set_grad_enabled(hidden_grad):
            for i in range(self.n_layers - 1):
                x = self._block(i, x.detach(), generators, step)
                zs.append(x)
        with torch.set_grad_enabled(output_grad):
            logits = self._block(self.n_layers - 1, x.detach(), generators, step)
        return zs, logits

    def _block(self, i: int, x: torch.Tensor, generators: list[torch.Generator] | None, step: int) -> torch.Tensor:
        """Block ``i`` as the single model's ``blocks[i]`` (an MLP's hidden block: product,
        activation, dropout when ``generators`` given; its last block: the product alone)."""
        if self.kind == "kan":
            return self._kan_layer(i, x)
        p = self.params
        if i == self.n_layers - 1:
            return _linear(x, p[f"blocks.{i}.weight"], p[f"blocks.{i}.bias"])
        x = self._act(_linear(x, p[f"blocks.{i}.0.weight"], p[f"blocks.{i}.0.bias"]))
        return x if generators is None else self._dropout(x, generators, step, i)

    def _kan_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        base_w, spline_w, scaler = (p[f"blocks.{i}.{n}"] for n in ("base_weight", "spline_weight", "spline_scaler"))
        grid = self.buffers[f"blocks.{i}.grid"]
        if x.dim() == 2:  # shared input: each activation once, its members in one product
            base = torch.cat([_linear(act(x), base_w[a:b]) for a, b, act in self.segments])
        else:
            base = _linear(self._act(x), base_w)
        members, out_f, in_f, n_bases = spline_w.shape
        scaled = spline_w * scaler.unsqueeze(-1)
        k = self.spline_order
        if closed_form_applies(k) and self.uniform[f"blocks.{i}.grid"]:
            t0, inv_h = self.origin_scale[f"blocks.{i}.grid"]
            weight = scaled.transpose(2, 3).reshape(members, out_f, n_bases * in_f)
            spline = StackedSpline.apply(x, weight, t0, inv_h, k)
        else:  # the reference recursion, as KANLinear does off the fast path
            bases = cox_de_boor_basis(x.reshape(-1, in_f), grid, k)
            if x.dim() == 2:
                spline = torch.einsum("bij,moij->mbo", bases, scaled)
            else:
                spline = torch.einsum("mbij,moij->mbo", bases.view(members, -1, in_f, n_bases), scaled)
        return base + spline

    # -- members as single models ---------------------------------------------------------------

    def member_state_dict(self, m: int) -> "OrderedDict[str, torch.Tensor]":
        """Member ``m`` as the single model's ``state_dict`` (copies: never the whole stack)."""
        state = OrderedDict()
        for key in self.keys:
            if key in self.params:
                state[key] = self.params[key].detach()[m].clone()
            else:
                state[key] = self.buffers[key].clone()
        return state
