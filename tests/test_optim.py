"""Optimizers, in the style of PyTorch's test/test_optim.py: float64 references for one
and two steps, a toy problem, state_dict round trips, param groups, bad input, and the
invariants of the multiplicative updates (signs, clamps, the LNS grid)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optim
from optim import EG, EGPM, AdamEG, AdamGD, LNSMadam, Madam
from quant import LNSFormat

W0 = [0.5, -0.25, 0.125, -1.0]
GRADS = [[0.2, -0.1, 0.4, 0.3], [-0.05, 0.3, 0.1, -0.2]]


def _steps(opt_factory, w0=W0, grads=GRADS):
    """Apply the given gradients with the optimizer (float64) and return the weights."""
    p = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = opt_factory([p])
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().tolist()


def _sign(x):
    return math.copysign(1.0, x) if x != 0 else 0.0


# -- one and two steps against hand-written float64 references ----------------------------
def test_eg_first_step_by_hand():
    # w = 0.5, g = 0.2, lr = 1: w * exp(-0.2); w = -0.25, g = -0.1: -0.25 * exp(-0.1).
    got = _steps(lambda ps: EG(ps, lr=1.0), grads=GRADS[:1])
    assert got[0] == pytest.approx(0.40936537653899097, abs=1e-15)
    assert got[1] == pytest.approx(-0.22620935450898988, abs=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_eg_two_steps_with_momentum_and_l2_decay(nesterov):
    lr, mu, wd = 0.7, 0.9, 0.01
    w, buf = list(W0), [None] * 4
    for g in GRADS:
        for i in range(4):
            d = g[i] + wd * w[i]
            buf[i] = d if buf[i] is None else mu * buf[i] + d
            direction = d + mu * buf[i] if nesterov else buf[i]
            w[i] = w[i] * math.exp(-lr * _sign(w[i]) * direction)
    got = _steps(lambda ps: EG(ps, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd,
                               decay="l2"))
    assert got == pytest.approx(w, abs=1e-14)


@pytest.mark.parametrize("normalize", [False, True])
def test_egpm_two_steps(normalize):
    lr, c, wd = 0.5, 0.1, 0.02
    u = [max(x, 0) + c for x in W0]
    v = [max(-x, 0) + c for x in W0]
    total = sum(u) + sum(v)
    w = list(W0)
    for g in GRADS:
        d = [g[i] + wd * w[i] for i in range(4)]
        u = [u[i] * math.exp(-lr * d[i]) for i in range(4)]
        v = [v[i] * math.exp(lr * d[i]) for i in range(4)]
        if normalize:
            k = total / (sum(u) + sum(v))
            u, v = [x * k for x in u], [x * k for x in v]
        w = [u[i] - v[i] for i in range(4)]
    got = _steps(lambda ps: EGPM(ps, lr=lr, offset=c, normalize=normalize, weight_decay=wd))
    assert got == pytest.approx(w, abs=1e-14)


def _adam_reference(apply):
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-8, 0.1
    w, m, v = list(W0), [0.0] * 4, [0.0] * 4
    for t, g in enumerate(GRADS, start=1):
        for i in range(4):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            d = (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
            w[i] = apply(w[i], d, lr, wd)
    return w, dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)


def test_adam_gd_two_steps_and_equals_adamw():
    want, hp = _adam_reference(lambda w, d, lr, wd: w * (1 - lr * wd) - lr * d)
    assert _steps(lambda ps: AdamGD(ps, **hp)) == pytest.approx(want, abs=1e-14)
    assert _steps(lambda ps: torch.optim.AdamW(ps, **hp)) == pytest.approx(want, abs=1e-14)


def test_adam_eg_two_steps_exp_decay():
    want, hp = _adam_reference(
        lambda w, d, lr, wd: w * math.exp(-lr * (_sign(w) * d + wd)))
    assert _steps(lambda ps: AdamEG(ps, decay="exp", **hp)) == pytest.approx(want, abs=1e-14)


def test_madam_first_step_by_hand():
    # At step 1 the normalized gradient is sign(g): |w| changes by exp(-+lr).
    got = _steps(lambda ps: Madam(ps, lr=0.1), grads=GRADS[:1])
    # w = -1, g = 0.3 > 0: the step grows |w| (the sign of w times the sign of g is -1).
    assert got == pytest.approx([0.5 * math.exp(-0.1), -0.25 * math.exp(-0.1),
                                 0.125 * math.exp(-0.1), -1.0 * math.exp(0.1)], abs=1e-15)


def _madam_reference(lr, p_scale, g_bound, beta, wd, w0=W0, grads=GRADS):
    w, s = list(w0), [0.0] * len(w0)
    w_max = p_scale * math.sqrt(sum(x * x for x in w0) / len(w0))
    normalized = []
    for t, g in enumerate(grads, start=1):
        gh = []
        for i in range(len(w)):
            s[i] = beta * s[i] + (1 - beta) * g[i] ** 2
            s_hat = s[i] / (1 - beta**t)
            gh.append(max(-g_bound, min(g_bound, g[i] / math.sqrt(s_hat))))
        normalized.append(gh)
    return w, w_max, normalized


def test_madam_two_steps_with_clamp_and_decay():
    lr, p_scale, g_bound, beta, wd = 0.3, 1.5, 1.2, 0.9, 0.05
    w, w_max, normalized = _madam_reference(lr, p_scale, g_bound, beta, wd)
    for gh in normalized:
        for i in range(4):
            w[i] = w[i] * math.exp(-lr * (_sign(w[i]) * gh[i] + wd))
            w[i] = max(-w_max, min(w_max, w[i]))
    got = _steps(lambda ps: Madam(ps, lr=lr, p_scale=p_scale, g_bound=g_bound, beta=beta,
                                  weight_decay=wd))
    assert got == pytest.approx(w, abs=1e-14)
    # The clamp was exercised: after step 1, w = -1 grew past w_max and stopped there.
    first = _steps(lambda ps: Madam(ps, lr=lr, p_scale=p_scale, g_bound=g_bound, beta=beta,
                                    weight_decay=wd), grads=GRADS[:1])
    assert first[3] == pytest.approx(-w_max, abs=1e-15)


def test_lns_madam_two_steps():
    lr, p_scale, g_bound, beta, bits, frac = 0.25, 3.0, 10.0, 0.999, 6, 2
    gamma, levels = 2**frac, 2 ** (bits - 1) - 1
    w, _, normalized = _madam_reference(lr, p_scale, g_bound, beta, 0.0)
    scale = p_scale * math.sqrt(sum(x * x for x in W0) / 4)
    e = [min(levels - 1, max(0, round(-math.log2(abs(x) / scale) * gamma))) for x in W0]
    sign = [_sign(x) for x in W0]
    for gh in normalized:
        e = [min(levels - 1, max(0, e[i] + round(lr * gamma * sign[i] * gh[i])))
             for i in range(4)]
    want = [sign[i] * scale * 2 ** (-e[i] / gamma) for i in range(4)]
    got = _steps(lambda ps: LNSMadam(ps, lr=lr, bits=bits, frac_bits=frac))
    assert got == pytest.approx(want, abs=1e-14)


# -- behaviour on a toy problem --------------------------------------------------------------
def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    w_true = torch.randn(8, 1, generator=gen)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        # Sign-preserving updates can only reach targets whose signs they start with.
        start = 0.1 * torch.randn(1, 8, generator=gen).abs() * torch.sign(w_true.T)
        model.weight.copy_(start)
        model.bias.zero_()
    return x, x @ w_true + 0.5, model


TOY_LR = {"gd": 0.1, "sgd": 0.05, "eg": 0.2, "egpm": 0.05, "adam_gd": 0.05,
          "adam_eg": 0.05, "madam": 0.05, "lns_madam": 0.125}


def _read_by(name, **hparams):
    """The hyperparameters optimizer ``name`` takes (build refuses any other)."""
    return {k: v for k, v in hparams.items() if k in optim.reads(name)}


def test_build_refuses_keywords_the_optimizer_does_not_take():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="'maximize' for optimizer 'sgd': it takes lr, "
                                         "weight_decay, momentum, nesterov"):
        optim.build("sgd", p, lr=0.1, maximize=True)
    with pytest.raises(ValueError, match="'weight_decy'"):
        optim.build("eg", p, lr=0.1, weight_decy=0.1)
    assert optim.readers("lns_bits") == ("lns_madam",)
    assert optim.defaults("sgd") == {"lr": None, "weight_decay": 0.0, "momentum": 0.9,
                                     "nesterov": True}


@pytest.mark.parametrize("name", sorted(TOY_LR))
def test_loss_falls_on_regression(name):
    x, y, model = _regression()
    # Madam's clamp is relative to the initial scale: give it room for the true weights.
    opt = optim.build_for_model(name, model, bias_lr=0.05, **_read_by(
        name, lr=TOY_LR[name], momentum=0.5, p_scale=30.0, lns_bits=12, lns_frac_bits=4))
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def _make(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = optim.build_for_model(name, model, bias_lr=0.02, **_read_by(
        name, lr=TOY_LR[name] / 4, momentum=0.9, nesterov=True, weight_decay=1e-3,
        lns_bits=10, lns_frac_bits=4, egpm_normalize=True))
    return model, opt


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(TOY_LR))
def test_state_dict_round_trip_then_training_equals_uninterrupted(name):
    model, opt = _make(name)
    _train(model, opt, 5, seed=1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 5, seed=2)

    resumed, resumed_opt = _make(name)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, 5, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kwargs", [
    (EG, dict(momentum=0.5)), (EGPM, dict(normalize=True)), (AdamGD, {}), (AdamEG, {}),
    (Madam, {}), (LNSMadam, dict(bits=8, frac_bits=3)),
])
def test_two_param_groups_equal_two_optimizers(cls, kwargs):
    torch.manual_seed(0)
    a, b = torch.randn(5, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    lr_a, lr_b = 0.05, 0.125
    grouped = cls([{"params": [a], "lr": lr_a}, {"params": [b], "lr": lr_b}], **kwargs)
    separate = [cls([a2], lr=lr_a, **kwargs), cls([b2], lr=lr_b, **kwargs)]
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        ga, gb = torch.randn(5, generator=g), torch.randn(3, 2, generator=g)
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        grouped.step()
        for opt in separate:
            opt.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


# -- bad hyperparameters --------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,name", [
    (EG, dict(lr=0.0), "lr"), (EG, dict(lr=0.1, momentum=1.0), "momentum"),
    (EG, dict(lr=0.1, nesterov=True), "nesterov"),
    (EG, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    (EG, dict(lr=0.1, multiplicative="yes"), "multiplicative"),
    (EGPM, dict(lr=0.1, offset=0.0), "offset"), (EGPM, dict(lr=float("nan")), "lr"),
    (AdamGD, dict(betas=(1.0, 0.9)), "betas[0]"), (AdamGD, dict(betas=(0.9, -0.1)), "betas[1]"),
    (AdamEG, dict(eps=0.0), "eps"), (AdamEG, dict(betas=(0.9,)), "betas"),
    (Madam, dict(p_scale=0.0), "p_scale"), (Madam, dict(g_bound=-1.0), "g_bound"),
    (Madam, dict(beta=1.0), "beta"), (LNSMadam, dict(bits=1), "bits"),
    (LNSMadam, dict(frac_bits=11), "frac_bits"), (LNSMadam, dict(bits=8.5), "bits"),
])
def test_bad_hyperparameters_raise_naming_them(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name.replace('[', '.').replace(']', '.')}"):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_unknown_optimizer_name_lists_the_allowed():
    with pytest.raises(ValueError, match="name='adagrad' is invalid: allowed one of adam_eg"):
        optim.build("adagrad", [torch.zeros(1)], lr=0.1)


# -- invariants of the multiplicative family -------------------------------------------------
def _random_steps(opt, params, steps=50, scale=1.0):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("cls,kwargs", [(EG, dict(lr=0.1, momentum=0.9)),
                                        (AdamEG, dict(lr=0.1)), (Madam, dict(lr=0.1))])
def test_multiplicative_updates_preserve_signs(cls, kwargs):
    p = torch.randn(200, requires_grad=True)
    before = torch.sign(p.detach()).clone()
    opt = cls([p], **kwargs)
    _random_steps(opt, [p])
    assert torch.equal(torch.sign(p.detach()), before)


def test_madam_magnitudes_stay_within_the_clamp():
    p = torch.randn(300, requires_grad=True)
    bound = 2.0 * p.detach().pow(2).mean().sqrt()
    opt = Madam([p], lr=0.5, p_scale=2.0)
    _random_steps(opt, [p], steps=100)
    assert p.detach().abs().max() <= bound * (1 + 1e-6)
    assert torch.isclose(p.detach().abs().max(), bound)  # it got there and stopped


@pytest.mark.parametrize("bits,frac_bits", [(3, 0), (4, 0), (4, 1), (6, 2), (8, 3), (12, 5),
                                            (16, 8)])
def test_lns_madam_weights_stay_on_the_grid(bits, frac_bits):
    p = torch.randn(257, requires_grad=True)
    opt = LNSMadam([p], lr=1.0 / (1 << frac_bits), bits=bits, frac_bits=frac_bits)
    fmt, scale = LNSFormat(bits, frac_bits), opt.state[p]["scale"]
    assert fmt.on_grid(p.detach(), scale)  # snapped at construction
    _random_steps(opt, [p], steps=30)
    assert fmt.on_grid(p.detach(), scale)
    exponent = opt.state[p]["exponent"]
    assert exponent.dtype == torch.int32
    assert 0 <= exponent.min() and exponent.max() <= fmt.levels - 1
    assert torch.equal(p.detach(), fmt.decode(opt.state[p]["sign"], exponent, scale))


def test_zero_weights_stay_zero_under_multiplicative_steps():
    for cls in (EG, AdamEG, Madam, LNSMadam):
        p = torch.tensor([0.0, 0.3], requires_grad=True)
        opt = cls([p], lr=0.1)
        _random_steps(opt, [p], steps=5)
        assert p[0].item() == 0.0 and p[1].item() != 0.3, cls.__name__


def test_split_params_lets_biases_move():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.Linear(3, 2))
    for layer in (model[0], model[2]):
        torch.nn.init.zeros_(layer.bias)
    groups = optim.split_params(model, bias_lr=0.05)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert groups[1] == {**groups[1], "multiplicative": False, "weight_decay": 0.0, "lr": 0.05}
    for name in ("eg", "adam_eg", "madam", "lns_madam"):
        net = copy.deepcopy(model)
        opt = optim.build_for_model(name, net, bias_lr=0.05, lr=0.05)
        _train_classifier(net, opt)
        assert net[0].bias.abs().sum() > 0 and net[2].bias.abs().sum() > 0, name


def test_egpm_moves_zero_weights_without_a_bias_group():
    p = torch.zeros(4, requires_grad=True)
    opt = EGPM([p], lr=1.0, offset=0.1)
    p.grad = torch.tensor([1.0, -1.0, 0.5, 0.0])
    opt.step()
    assert p[0] < 0 < p[1] and p[2] < 0 and p[3] == 0


def _train_classifier(model, opt, steps=5):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 2, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
