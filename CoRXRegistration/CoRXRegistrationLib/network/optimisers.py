"""The two small optimisers the registration steps use: Adam (rigid pre-alignment, refinement) and L-BFGS
with a strong-Wolfe line search (the SPECT/CT offset fit).

Why not ``torch.optim``: its first optimiser in a process imports ``torch._dynamo`` (about 1 s on 2 CPU
cores, measured with torch 2.13), which every ``corx`` command paid for a fit of 4 or 6 parameters; and
these fits then depend on one library's version of the algorithms, which the PyTorch extension in Slicer
may change. Both run on the parameters' device; the L-BFGS bookkeeping (a handful of numbers) is in
float64 on the CPU.
"""
from __future__ import annotations

import math

import torch


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) without weight decay, the moments updated in place:
    m <- m + (1 - beta1)(g - m), v <- beta2 v + (1 - beta2) g^2,
    p <- p - (lr / (1 - beta1^k)) m / (sqrt(v) / sqrt(1 - beta2^k) + eps) at step k.
    Same interface as the part of ``torch.optim.Adam`` used here: ``zero_grad()``, then backward, ``step()``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), betas, float(eps)
        self.steps = 0
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        step_size = self.lr / (1.0 - self.beta1 ** self.steps)
        root_correction2 = (1.0 - self.beta2 ** self.steps) ** 0.5
        for p, m, v in zip(self.params, self._m, self._v):
            if p.grad is None:
                continue
            g = p.grad
            m.lerp_(g, 1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            p.addcdiv_(m, (v.sqrt() / root_correction2).add_(self.eps), value=-step_size)


def _cubic_minimum(x1, f1, g1, x2, f2, g2, lo, hi) -> float:
    """Minimiser in [lo, hi] of the cubic through (x1, f1) and (x2, f2) with slopes g1, g2 (Nocedal &
    Wright 2006, eq. 3.59); the middle of [lo, hi] when the cubic has no minimum there."""
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2)
    square = d1 * d1 - g1 * g2
    if square < 0 or not math.isfinite(square):
        return 0.5 * (lo + hi)
    d2 = math.copysign(math.sqrt(square), x2 - x1)
    denominator = g2 - g1 + 2.0 * d2
    if denominator == 0 or not math.isfinite(denominator):
        return 0.5 * (lo + hi)
    x = x2 - (x2 - x1) * (g2 + d2 - d1) / denominator
    return min(max(x, lo), hi) if math.isfinite(x) else 0.5 * (lo + hi)


class _Objective:
    """f and its gradient at x (float64 CPU vectors), counting evaluations."""

    def __init__(self, function, limit: int):
        self.function, self.limit, self.evaluations = function, limit, 0

    def __call__(self, x: torch.Tensor) -> tuple:
        self.evaluations += 1
        f, g = self.function(x)
        f = float(f.detach()) if isinstance(f, torch.Tensor) else float(f)
        # a non-finite value counts as +inf: the line search steps back from it
        return (f if math.isfinite(f) else math.inf), g.detach().cpu().double().flatten()


def _strong_wolfe(objective, x, f0, g0, direction, t, c1=1e-4, c2=0.9, tolerance=1e-9, max_steps=25) -> tuple:
    """Step length t along ``direction`` meeting the strong Wolfe conditions (Nocedal & Wright 2006,
    algorithms 3.5 and 3.6, cubic interpolation); returns (f, g, t) at the accepted step, or at the best
    point seen when the search runs out of steps."""
    slope0 = float(g0 @ direction)
    step_scale = float(direction.abs().max())
    t_prev, f_prev, slope_prev, g_prev = 0.0, f0, slope0, g0
    f, g = objective(x + t * direction)
    slope = float(g @ direction)
    bracket = None
    for i in range(max_steps):
        if f > f0 + c1 * t * slope0 or (i > 0 and f >= f_prev):
            bracket = [(t_prev, f_prev, slope_prev, g_prev), (t, f, slope, g)]
            break
        if abs(slope) <= -c2 * slope0:
            return f, g, t
        if slope >= 0:
            bracket = [(t, f, slope, g), (t_prev, f_prev, slope_prev, g_prev)]
            break
        if objective.evaluations >= objective.limit:
            return f, g, t
        t_next = _cubic_minimum(t_prev, f_prev, slope_prev, t, f, slope, t + 0.01 * (t - t_prev), 10.0 * t)
        t_prev, f_prev, slope_prev, g_prev = t, f, slope, g
        t = t_next
        f, g = objective(x + t * direction)
        slope = float(g @ direction)
    if bracket is None:
        return f, g, t
    # zoom: bracket[0] is the low end (lower f, satisfies sufficient decrease), bracket[1] the other end
    low, high = bracket
    for _ in range(max_steps):
        a, b = sorted((low[0], high[0]))
        if (b - a) * step_scale < tolerance or objective.evaluations >= objective.limit:
            break
        t = _cubic_minimum(low[0], low[1], low[2], high[0], high[1], high[2], a, b)
        margin = 0.1 * (b - a)                   # stay off the bracket's ends
        t = min(max(t, a + margin), b - margin)
        f, g = objective(x + t * direction)
        slope = float(g @ direction)
        if f > f0 + c1 * t * slope0 or f >= low[1]:
            high = (t, f, slope, g)
        else:
            if abs(slope) <= -c2 * slope0:
                return f, g, t
            if slope * (high[0] - low[0]) >= 0:
                high = low
            low = (t, f, slope, g)
    return low[1], low[3], low[0]                # t = 0 when nothing lowered f


def lbfgs_minimise(function, x0: torch.Tensor, max_iterations: int = 20, history: int = 100,
                   tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                   max_evaluations: int | None = None, tolerance_step: float | None = None) -> tuple:
    """Minimise ``function(x) -> (value, gradient)`` over a small vector ``x`` (L-BFGS, Nocedal & Wright
    2006 algorithm 7.4, with the strong-Wolfe line search; the first step is scaled to at most 1 in the
    L1 norm of the gradient). ``max_evaluations``: default 1.25 x ``max_iterations``. ``tolerance_step``
    (units of x, largest component; default ``tolerance_change``): a line search stops narrowing its
    bracket below it, and the minimisation stops after two iterations in a row that moved x less (one
    short step alone also happens far from the minimum, in a curved valley). Returns (x at the minimum
    found, float64 CPU; the value at ``x0``; the number of evaluations)."""
    step_tolerance = tolerance_change if tolerance_step is None else tolerance_step
    x = x0.detach().cpu().double().flatten().clone()
    objective = _Objective(function, max_evaluations or int(max_iterations * 1.25))
    f, g = objective(x)
    f_start = f
    if float(g.abs().max()) <= tolerance_grad:
        return x, f_start, objective.evaluations
    s_list, y_list, rho_list = [], [], []
    scaling = 1.0
    short_steps = 0                              # consecutive iterations that moved x less than step_tolerance
    for k in range(max_iterations):
        q = -g.clone()
        alphas = []
        for s, y, rho in zip(reversed(s_list), reversed(y_list), reversed(rho_list)):
            alpha = rho * float(s @ q)
            q -= alpha * y
            alphas.append(alpha)
        q *= scaling
        for (s, y, rho), alpha in zip(zip(s_list, y_list, rho_list), reversed(alphas)):
            q += (alpha - rho * float(y @ q)) * s
        direction = q
        slope = float(g @ direction)
        if slope > -tolerance_change:
            break
        t = min(1.0, 1.0 / float(g.abs().sum())) if k == 0 else 1.0
        f_new, g_new, t = _strong_wolfe(objective, x, f, g, direction, t, tolerance=step_tolerance)
        step = t * direction
        if t == 0.0:
            break
        x = x + step
        y = g_new - g
        ys = float(y @ step)
        if ys > 1e-10:
            if len(s_list) == history:
                s_list.pop(0), y_list.pop(0), rho_list.pop(0)
            s_list.append(step), y_list.append(y), rho_list.append(1.0 / ys)
            scaling = ys / float(y @ y)
        change, moved = abs(f_new - f), float(step.abs().max())
        f, g = f_new, g_new
        if (objective.evaluations >= objective.limit or float(g.abs().max()) <= tolerance_grad
                or moved <= tolerance_change or change < tolerance_change):
            break
        short_steps = short_steps + 1 if moved <= step_tolerance else 0
        if short_steps == 2:
            break
    return x, f_start, objective.evaluations
