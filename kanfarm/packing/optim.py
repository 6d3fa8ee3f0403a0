"""Per-member optimisers over stacked parameters: SGD, SGD + Nesterov momentum 0.9, and Adam.

Each member's update is torch.optim's single-tensor formula for that run alone (same op order,
scalars rounded as torch rounds them), so a packed member follows its solo run to the last bit
where the products agree. Members are sorted by optimiser, so each kind updates a contiguous
slice (views, no copies). A member whose loss went non-finite (``alive`` False) keeps its
parameters and state: updates are masked with ``torch.where``, so NaN never spreads.

On CUDA (float32, Triton importable, ``KANFARM_TRITON`` not 0 or off) the same step runs as one fused
kernel per stacked parameter (``triton_pack``): a pack of small models is bound by launches.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kanfarm.models.uniform_spline import fused_kernels_apply
from kanfarm.training.optim import make_optimizer

MOMENTUM = 0.9
BETAS = (0.9, 0.999)
EPS = 1e-8


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(k,)`` -> ``(k, 1, ..., 1)`` broadcasting against a stacked tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """``kinds[m]`` in ('sgd', 'sgd_momentum', 'adam'), sorted; ``lrs[m]`` per member.

    ``steps`` counts the pack's updates (shared: members of a pack start at the same epoch).
    ``groups`` names the single run's optimisers and their parameters (default ``{"all": every
    parameter}``, the backprop trainer's; HSIC has ``hidden0``, ..., ``output``); each group counts
    its own updates in ``group_steps`` (Adam's bias correction, momentum's first step), since an
    HSIC run's blocks train in different epochs. A step updates the parameters given gradients.
    """

    def __init__(self, params: dict[str, torch.Tensor], kinds: list[str], lrs: list[float], steps: int = 0,
                 fused: bool | None = None, groups: dict[str, list[str]] | None = None,
                 group_steps: dict[str, int] | None = None):
        """``fused``: use the Triton step (None: when the parameters are float32 CUDA tensors)."""
        if kinds != sorted(kinds, key=_ORDER.index):
            raise ValueError("members must be sorted by optimiser kind")
        self.kinds, self.lrs, self.steps = list(kinds), [float(lr) for lr in lrs], steps
        self.groups = {g: list(names) for g, names in (groups or {"all": list(params)}).items()}
        self.group_of = {name: g for g, names in self.groups.items() for name in names}
        if sorted(self.group_of) != sorted(params):
            raise ValueError("groups must hold every parameter exactly once")
        self.group_steps = {g: steps for g in self.groups} if group_steps is None else dict(group_steps)
        first = next(iter(params.values()))
        self.fused = fused_kernels_apply(first) if fused is None else fused
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in params.items():
            self.state[name] = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        self._lr_cache(first.device)

    def _lr_cache(self, device: torch.device) -> None:
        self._views_key = None  # state tensors change with the members: views are rebuilt
        self.slices = {}
        for kind in _ORDER:
            idx = [m for m, k in enumerate(self.kinds) if k == kind]
            if idx:
                self.slices[kind] = slice(idx[0], idx[-1] + 1)
        self.lr64 = torch.tensor(self.lrs, dtype=torch.float64, device=device)
        self.kind_codes = torch.tensor([_ORDER.index(k) for k in self.kinds], dtype=torch.int32, device=device)
        # torch passes alpha=-lr as a Python float, which the kernel rounds to float32
        self.neg_lr = (-self.lr64).float()

    def keep(self, members: list[int]) -> None:
        idx = torch.tensor(members, device=self.lr64.device)
        for st in self.state.values():
            for key in st:
                st[key] = st[key].index_select(0, idx)
        self.kinds = [self.kinds[m] for m in members]
        self.lrs = [self.lrs[m] for m in members]
        self._lr_cache(self.lr64.device)

    def _views(self, params: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple]]:
        """Per parameter and optimiser kind: the member slice of the parameter and of its state,
        and the learning rates as a broadcastable column. Built once per set of parameter tensors
        (a pack's parameters are updated in place; ``keep`` replaces them), so a step does no
        slicing beyond the gradients'."""
        key = [(name, id(p)) for name, p in params.items()]
        if self._views_key != key:
            views: dict[str, dict[str, tuple]] = {}
            for name, p in params.items():
                p, st = p.detach(), self.state[name]
                views[name] = {kind: (p[sl], {k: v[sl] for k, v in st.items()}, _col(self.neg_lr[sl], p[sl]))
                               for kind, sl in self.slices.items()}
            self._views_key, self._views_cache = key, views
        return self._views_cache

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], alive: torch.Tensor) -> None:
        """Update the parameters named in ``grads`` (whole groups) for the members ``alive``."""
        self.steps += 1
        for group in {self.group_of[name] for name in grads}:
            self.group_steps[group] += 1
        if self.fused:
            from kanfarm.packing.triton_pack import fused_step

            neg_steps: dict[int, torch.Tensor] = {}
            for name, g in grads.items():
                step = self.group_steps[self.group_of[name]]
                bc1, bc2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
                if step not in neg_steps:
                    neg_steps[step] = (-(self.lr64 / bc1)).float()
                fused_step(params[name].detach(), g, self.state[name], self.kind_codes, self.neg_lr, neg_steps[step],
                           alive, first_step=step == 1, bc2_sqrt=bc2 ** 0.5, momentum=MOMENTUM, betas=BETAS,
                           eps=EPS)
            return
        views = self._views(params)
        per_kind: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, g in grads.items():
            step = self.group_steps[self.group_of[name]]
            bc1, bc2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
            bc2_sqrt = bc2 ** 0.5
            for kind, sl in self.slices.items():
                p, st, neg_lr = views[name][kind]
                g_sl = g[sl]
                if (kind, p.dim(), step) not in per_kind:  # live mask and Adam's step size, once per step
                    neg_step = _col((-(self.lr64[sl] / bc1)).float(), p) if kind == "adam" else None
                    per_kind[(kind, p.dim(), step)] = (_col(alive[sl], p), neg_step)
                live, neg_step = per_kind[(kind, p.dim(), step)]
                if kind == "sgd":
                    _commit(p, torch.addcmul(p, g_sl, neg_lr), live)
                elif kind == "sgd_momentum":
                    buf = st["momentum_buffer"]
                    new_buf = g_sl.clone() if step == 1 else buf.mul(MOMENTUM).add_(g_sl)
                    _commit(buf, new_buf, live)
                    direction = g_sl.add(buf, alpha=MOMENTUM)
                    _commit(p, torch.addcmul(p, direction, neg_lr), live)
                else:
                    exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
                    _commit(exp_avg, exp_avg.lerp(g_sl, 1 - BETAS[0]), live)
                    _commit(exp_avg_sq, exp_avg_sq.mul(BETAS[1]).addcmul_(g_sl, g_sl, value=1 - BETAS[1]), live)
                    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(EPS)
                    _commit(p, p + (neg_step * exp_avg) / denom, live)

    # -- members in torch.optim's format --------------------------------------------------------

    def _group_params(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
        named = dict(model.named_parameters())
        return {g: [(name, named[name]) for name in names] for g, names in self.groups.items()}

    def member_state_dict(self, m: int, model: nn.Module) -> dict[str, dict]:
        """Member ``m``'s optimisers as the single run's trainer saves them: group name ->
        ``torch.optim`` ``state_dict()`` over that group's parameters of the single model ``model``."""
        out = {}
        for group, named in self._group_params(model).items():
            opt = make_optimizer(self.kinds[m], [p for _, p in named], self.lrs[m])
            steps = self.group_steps[group]
            if steps > 0:
                for name, param in named:
                    st = self.state[name]
                    if self.kinds[m] == "sgd_momentum":
                        opt.state[param] = {"momentum_buffer": st["momentum_buffer"][m].clone()}
                    elif self.kinds[m] == "adam":
                        opt.state[param] = {"step": torch.tensor(float(steps), dtype=torch.float32),
                                            "exp_avg": st["exp_avg"][m].clone(),
                                            "exp_avg_sq": st["exp_avg_sq"][m].clone()}
            out[group] = opt.state_dict()
        return out

    def load_member(self, m: int, model: nn.Module, saved: dict[str, dict]) -> None:
        """Load a single run's optimisers (``member_state_dict``'s layout) into member ``m``."""
        for group, named in self._group_params(model).items():
            opt = make_optimizer(self.kinds[m], [p for _, p in named], self.lrs[m])
            opt.load_state_dict(saved[group])
            for name, param in named:
                st = opt.state.get(param, {})
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if st.get(key) is not None:
                        self.state[name][key][m].copy_(st[key])
                if "step" in st and not _same_step(float(st["step"]), self.group_steps[group]):
                    raise ValueError(f"member {m}: {group} optimiser step {int(st['step'])} != "
                                     f"pack step {self.group_steps[group]}")


#: float32 holds every whole number up to this one, and not the next
FLOAT32_WHOLE = 2 ** 24


def _same_step(saved: float, steps: int) -> bool:
    """Whether a saved Adam step (a float32 tensor, as torch keeps it) is ``steps`` updates: float32
    counts whole numbers exactly up to 2^24, where torch's own counter stops growing, so from there
    on any saved step of 2^24 or more is a match (the bias corrections are 1 by then)."""
    return saved == steps if steps < FLOAT32_WHOLE else saved >= FLOAT32_WHOLE


_ORDER = ["sgd", "sgd_momentum", "adam"]


def _commit(dst: torch.Tensor, new: torch.Tensor, live: torch.Tensor) -> None:
    """``dst = new`` for live members, unchanged for the others: one kernel, written in place."""
    torch.where(live, new, dst, out=dst)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
