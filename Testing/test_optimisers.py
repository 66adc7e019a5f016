"""The registration's own optimisers and the closed-form LNCC gradient, against torch's."""
import subprocess
import sys

import numpy as np
import torch

from CoRXRegistrationLib.network.metrics import (local_cc_squared_against, local_statistics,
                                                 mean_local_cc_squared_and_gradient)
from CoRXRegistrationLib.network.optimisers import Adam, lbfgs_minimise


def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[2]) ** 2 + 100 * (x[3] - x[2] ** 2) ** 2


def _value_and_gradient(x):
    x = x.clone().requires_grad_(True)
    f = _rosenbrock(x)
    (g,) = torch.autograd.grad(f, x)
    return f, g


def test_adam_takes_the_same_steps_as_torch_adam():
    torch.manual_seed(0)
    a, b = torch.randn(6, 6), torch.randn(6)

    def run(optimiser_class):
        x = torch.zeros(6, requires_grad=True)
        opt = optimiser_class([x], lr=0.01)
        for _ in range(200):
            loss = ((a @ x - b) ** 2).sum() + torch.sin(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return x.detach()
    ours, theirs = run(Adam), run(torch.optim.Adam)
    assert float(ours.abs().max()) > 0.1                      # it moved
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_lbfgs_finds_the_rosenbrock_minimum_and_follows_torch_lbfgs():
    start = torch.tensor([-1.2, 1.0, -0.5, 0.3], dtype=torch.float64)
    x, f_start, evaluations = lbfgs_minimise(_value_and_gradient, start, max_iterations=200)
    np.testing.assert_allclose(x.numpy(), np.ones(4), atol=1e-3)
    assert f_start == float(_rosenbrock(start)) and evaluations < 100
    # a short run stops where torch's L-BFGS with the strong-Wolfe search stops, after as many evaluations
    short, _, n_short = lbfgs_minimise(_value_and_gradient, start, max_iterations=15)
    p = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], max_iter=15, line_search_fn="strong_wolfe")
    count = [0]

    def closure():
        count[0] += 1
        opt.zero_grad()
        f = _rosenbrock(p)
        f.backward()
        return f
    opt.step(closure)
    np.testing.assert_allclose(short.numpy(), p.detach().numpy(), atol=1e-4)
    assert n_short == count[0]


def test_lbfgs_stops_at_once_at_a_minimum_and_steps_back_from_non_finite_values():
    x, _, evaluations = lbfgs_minimise(lambda v: ((v ** 2).sum(), 2 * v), torch.zeros(3))
    assert evaluations == 1 and float(x.abs().max()) == 0.0

    def walled(v):                                   # NaN beyond 0.5: the minimum at 0.4 is still found
        f = (v - 0.4) ** 2
        return (f.sum() if float(v.max()) < 0.5 else torch.tensor(float("nan"))), 2 * (v - 0.4)
    x, _, _ = lbfgs_minimise(walled, torch.zeros(1), max_iterations=30)
    assert abs(float(x[0]) - 0.4) < 1e-3


def test_lbfgs_step_tolerance_ends_the_dithering_at_a_rippled_minimum():
    """Near the optimum of an image similarity, float noise makes ripples that keep the line search busy;
    two iterations in a row that move x less than ``tolerance_step`` end the fit at the same minimum."""
    a = torch.tensor([1.0, 10.0, 3.0, 0.5], dtype=torch.float64)
    c = torch.tensor([0.7, -0.3, 0.2, 2.0], dtype=torch.float64)

    def rippled(x):                                 # ripples of 1e-6 in the value, 1e-3 in the gradient
        x = x.double()
        return ((a * (x - c) ** 2).sum() + 1e-6 * torch.sin(1e3 * x).sum(),
                2 * a * (x - c) + 1e-3 * torch.cos(1e3 * x))
    full, _, n_full = lbfgs_minimise(rippled, torch.zeros(4), max_iterations=40)
    short, _, n_short = lbfgs_minimise(rippled, torch.zeros(4), max_iterations=40, tolerance_step=0.01)
    assert float((full - c).abs().max()) < 2e-3 and float((short - c).abs().max()) < 2e-3
    assert n_short < n_full - 3
    # a tolerance below what the steps reach changes nothing
    start = torch.tensor([-1.2, 1.0, -0.5, 0.3], dtype=torch.float64)
    same, _, n_same = lbfgs_minimise(_value_and_gradient, start, max_iterations=200, tolerance_step=1e-6)
    reference, _, n_reference = lbfgs_minimise(_value_and_gradient, start, max_iterations=200)
    assert n_same == n_reference and torch.equal(same, reference)


def test_closed_form_lncc_gradient_matches_autograd():
    torch.manual_seed(1)
    a = torch.rand(1, 1, 14, 11, 17, dtype=torch.float64)
    b = (0.5 * a + 0.3 * torch.rand_like(a)).requires_grad_(True)
    with torch.no_grad():
        b[0, 0, :3] = 0.2                           # flat windows: the variance clamp and eps matter there
    fixed = local_statistics(a)
    local_cc_squared_against(fixed, b).mean().backward()
    value, gradient = mean_local_cc_squared_and_gradient(fixed, b)
    assert abs(float(value) - float(local_cc_squared_against(fixed, b.detach()).mean())) < 1e-12
    torch.testing.assert_close(gradient, b.grad, rtol=1e-9, atol=1e-15)


def test_registration_steps_do_not_load_torch_compiler_machinery():
    """torch.optim's first use imports torch._dynamo (about 1 s per command); the rigid stage and the
    SPECT/CT fit must not."""
    code = """
import sys, torch
from CoRXRegistrationLib.network.rigid import rigid_prealign
from CoRXRegistrationLib.network.spect_offset import fit_spect_offset
g = torch.zeros(1, 1, 24, 24, 24); g[..., 6:18, 6:18, 6:18] = 1.0
m = torch.roll(g, 1, dims=3)
rigid_prealign(g, m, 0.5)
fit = fit_spect_offset(g, m, torch.zeros(1, 3, 24, 24, 24), 4.0)
assert fit.evaluations > 1, fit
print('torch._dynamo' in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
