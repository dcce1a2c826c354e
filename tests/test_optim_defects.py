"""The optimizers on the inputs a long sweep eventually produces (inf/NaN gradients, tiny
gradients, sparse gradients, bf16 state, param groups added later) and the research
code's formulas (seed 000: EG decay ``wd * sign(w)``, AdamWeg decay ``w *= 1 - lr * wd``,
GD with frozen signs), written out by hand in float64. Issue 10."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optim
from optim import EG, AdamEG, AdamGD, GDSign, LNSMadam, Madam
from quant import LNSFormat

# An lr each registry optimizer takes without leaving its useful range.
LR = {"gd": 0.1, "sgd": 0.05, "gd_sign": 0.1, "eg": 0.5, "egpm": 0.5, "adam_gd": 0.01,
      "adam_eg": 0.05, "madam": 0.05, "lns_madam": 0.125}


def test_every_registry_optimizer_is_covered():
    assert set(LR) == set(optim.available())


def _param(dtype=torch.float32, seed=0, shape=(4, 3)):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


def _bad_grad(shape=(4, 3), seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen)
    g[0, 0], g[1, 1], g[2, 2] = math.inf, -math.inf, math.nan
    return g




# -- non-finite gradients: one policy for every optimizer ---------------------------------
def _snapshot(opt):
    return copy.deepcopy(opt.state_dict()["state"])


def _same_state(a, b):
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for key, value in a[index].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[index][key]), key
            else:
                assert value == b[index][key], key


@pytest.mark.parametrize("name", sorted(LR))
def test_a_non_finite_gradient_skips_the_step_and_counts_it(name):
    """The policy: a step with any inf/NaN gradient changes no weight and no state (as
    GradScaler skips a step); ``skipped_steps`` counts it."""
    p, q = _param(), _param(seed=5, shape=(3,))
    opt = optim.build(name, [p, q], lr=LR[name])
    p.grad, q.grad = torch.randn(4, 3), torch.randn(3)
    opt.step()  # state exists now: the skipped step must leave it alone too
    before, state = (p.detach().clone(), q.detach().clone()), _snapshot(opt)
    p.grad, q.grad = _bad_grad(), torch.randn(3)  # q's gradient is finite: skipped too
    opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]), name
    _same_state(_snapshot(opt), state)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", sorted(LR))
def test_a_skipped_step_leaves_training_as_if_it_never_happened(name):
    """Steps g1, bad, g2 equal steps g1, g2 bit for bit (weights and state), also when
    the bad gradient comes first, before any state exists."""
    gen = torch.Generator().manual_seed(3)
    g1, g2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    for order in (("bad", g1, g2), (g1, "bad", g2)):
        p, q = _param(), _param()
        opt_p, opt_q = optim.build(name, [p], lr=LR[name]), optim.build(name, [q], lr=LR[name])
        for g in order:
            p.grad = _bad_grad() if isinstance(g, str) else g.clone()
            opt_p.step()
        for g in (g1, g2):
            q.grad = g.clone()
            opt_q.step()
        assert torch.equal(p, q), name
        _same_state(_snapshot(opt_p), _snapshot(opt_q))


def test_an_all_nan_gradient_does_not_advance_adams_step_count():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_p, opt_q = AdamGD([p], lr=0.1), AdamGD([q], lr=0.1)
    p.grad = torch.full((3,), math.nan)
    opt_p.step()
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt_p.step()
    opt_q.step()
    assert torch.equal(p, q) and p[0].item() == pytest.approx(0.9)  # a full first step


def test_sgd_step_hooks_run_once_even_after_a_plain_torch_sgd_exists():
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)  # torch wraps SGD.step
    p = torch.nn.Parameter(torch.ones(2))
    opt = optim.build("sgd", [p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    p.grad = torch.ones(2)
    opt.step()
    assert calls == ["pre", "post"]


def test_lns_madam_snaps_a_param_that_gets_its_gradient_in_the_closure():
    w = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    opt = LNSMadam([w])
    w.requires_grad_(True)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert LNSFormat(8, 3).on_grid(w.detach(), opt.state[w]["scale"])


@pytest.mark.parametrize("cls", [LNSMadam, Madam])
def test_an_inf_gradient_leaves_the_weight(cls):
    # Before: LNS-Madam jumped p[0, 0] to the top of its grid (NaN cast to an integer
    # exponent, clamped to code 0); Madam made it NaN (inf/inf passed its s > 0 test).
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([p])
    before = p.detach().clone()
    g = torch.randn(4, 3)
    g[0, 0] = float("inf")
    p.grad = g
    opt.step()
    assert torch.isfinite(p).all() and p[0, 0].item() == before[0, 0].item()
    if cls is LNSMadam:
        assert opt.state[p]["exponent"].min() >= 0


def test_eg_positive_weight_meeting_plus_inf_is_not_set_to_zero():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    opt = EG([p], lr=1.0)
    p.grad = torch.tensor([math.inf, -math.inf])
    opt.step()
    assert p.tolist() == [0.5, -0.5]


def test_madam_tiny_float32_gradient_takes_a_full_bounded_step():
    # g = 1e-23: g**2 underflows to 0 in float32; the reference's g / sqrt(0) = inf is
    # clamped to g_bound, a full bounded step (an exactly-zero gradient stays no step).
    lr, g_bound = 0.01, 10.0
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.25]))
    opt = Madam([p], lr=lr, g_bound=g_bound)
    p.grad = torch.tensor([1e-23, 1e-23, 0.0])
    opt.step()
    expected = [0.5 * math.exp(-lr * g_bound), -0.5 * math.exp(lr * g_bound), 0.25]
    assert p.tolist() == pytest.approx(expected, rel=1e-6)


def test_madam_nan_gradient_does_not_freeze_the_coordinate():
    p = torch.nn.Parameter(torch.tensor([0.5, 0.5]))
    opt = Madam([p], lr=0.01)
    p.grad = torch.tensor([math.nan, 1.0])
    opt.step()
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert p[0].item() < 0.5
    assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


# -- sparse gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(LR) - {"gd", "sgd"}))
def test_sparse_gradients_raise_a_clear_error(name):
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = optim.build(name, [p], lr=LR[name])
    emb = torch.nn.functional.embedding(torch.tensor([0, 2]), p, sparse=True)
    emb.sum().backward()
    assert p.grad.is_sparse
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_gd_keeps_torch_sgd_sparse_support():
    p = torch.nn.Parameter(torch.randn(5, 3))
    q = torch.nn.Parameter(p.detach().clone())
    torch.nn.functional.embedding(torch.tensor([0, 2]), p, sparse=True).sum().backward()
    optim.build("gd", [p], lr=0.1).step()
    q.grad = torch.zeros(5, 3)
    q.grad[[0, 2]] = 1.0
    torch.optim.SGD([q], lr=0.1).step()
    assert torch.equal(p.detach(), q.detach())


# -- LNS-Madam: param groups added later, frozen parameters, bf16 resume ---------------------
def test_lns_madam_add_param_group_then_step():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 2))
    opt = LNSMadam([a])
    opt.add_param_group({"params": [b], "lr": 0.25})
    fmt = LNSFormat(8, 3)
    assert fmt.on_grid(b.detach(), opt.state[b]["scale"])  # snapped when added
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    assert fmt.on_grid(b.detach(), opt.state[b]["scale"])


def test_lns_madam_leaves_frozen_parameters_alone():
    frozen = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    before = frozen.detach().clone()
    opt = LNSMadam([frozen, torch.nn.Parameter(torch.randn(2, 2))])
    assert torch.equal(frozen, before) and frozen not in opt.state


def _lm_train(p, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name", sorted(LR))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_resume_equals_uninterrupted(name, dtype):
    def make():
        p = _param(dtype, seed=3, shape=(64, 64))
        kwargs = {"lr": LR[name]}
        if "lns_bits" in optim.reads(name):  # exponents above 256: not exact in bf16
            kwargs.update(lns_bits=12, lns_frac_bits=5)
        return p, optim.build(name, [p], **kwargs)

    p, opt = make()
    _lm_train(p, opt, 5, seed=1)
    saved_p, saved_opt = p.detach().clone(), copy.deepcopy(opt.state_dict())
    _lm_train(p, opt, 10, seed=2)
    q, resumed = make()
    with torch.no_grad():
        q.copy_(saved_p)
    resumed.load_state_dict(saved_opt)
    _lm_train(q, resumed, 10, seed=2)
    assert torch.equal(p.detach(), q.detach()), (p - q).abs().max()


# -- the seed's forms: EG sign decay, AdamEG decoupled decay, GD with frozen signs ---------
def test_eg_default_decay_is_the_seeds_sign_form():
    lr, wd = 0.5, 0.01
    w0 = [0.02, 0.2, 2.0, -0.2]
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = EG([p], lr=lr, weight_decay=wd)
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    # d = g + wd * sign(w); w * exp(-lr * sign(w) * d) = w * exp(-lr * wd) for every |w|.
    assert [w / w_0 for w, w_0 in zip(p.tolist(), w0, strict=True)] == pytest.approx(
        [math.exp(-lr * wd)] * 4, abs=1e-15)
    assert math.exp(-lr * wd) == pytest.approx(0.99501, abs=1e-5)


def test_eg_l2_decay_option_keeps_the_old_form():
    lr, wd = 0.5, 0.01
    p = torch.nn.Parameter(torch.tensor([0.02, 0.2, 2.0], dtype=torch.float64))
    opt = EG([p], lr=lr, weight_decay=wd, decay="l2")
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    factors = [w / w0 for w, w0 in zip(p.tolist(), [0.02, 0.2, 2.0], strict=True)]
    assert factors == pytest.approx([0.99990, 0.99900, 0.99005], abs=1e-5)


def test_eg_sign_decay_with_gradient_and_momentum_by_hand():
    lr, mu, wd = 0.7, 0.9, 0.01
    w, buf = [0.5, -0.25, 0.125], [None] * 3
    grads = [[0.2, -0.1, 0.4], [-0.05, 0.3, 0.1]]
    for g in grads:
        for i in range(3):
            s = math.copysign(1.0, w[i])
            d = g[i] + wd * s
            buf[i] = d if buf[i] is None else mu * buf[i] + d
            w[i] = w[i] * math.exp(-lr * s * buf[i])
    p = torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.125], dtype=torch.float64))
    opt = EG([p], lr=lr, momentum=mu, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert p.tolist() == pytest.approx(w, abs=1e-15)


def _adam_reference(w, grads, lr, betas, eps, wd, decay, amsgrad=False, maximize=False):
    """AdamWeg of the seed, written out in float64 (decay 'decoupled': w *= 1 - lr wd)."""
    m, v, vmax = [0.0] * len(w), [0.0] * len(w), [0.0] * len(w)
    w = list(w)
    for t, g in enumerate(grads, start=1):
        for i in range(len(w)):
            gi = -g[i] if maximize else g[i]
            m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            vmax[i] = max(vmax[i], v[i])
            v_used = vmax[i] if amsgrad else v[i]
            d = (m[i] / (1 - betas[0] ** t)) / (math.sqrt(v_used / (1 - betas[1] ** t)) + eps)
            s = math.copysign(1.0, w[i])
            if decay == "decoupled":
                w[i] = w[i] * (1 - lr * wd)
            else:
                w[i] = w[i] * math.exp(-lr * wd)
            w[i] = w[i] * math.exp(-lr * s * d)
    return w


GRADS3 = [[0.2, -0.1, 0.4], [-0.05, 0.3, 0.1], [0.3, 0.2, -0.3]]


@pytest.mark.parametrize("decay", [None, "decoupled", "exp"])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (True, True)])
def test_adam_eg_decay_forms_and_options_by_hand(decay, amsgrad, maximize):
    lr, wd = 0.05, 0.1
    w0 = [0.5, -0.25, 0.125]
    expected = _adam_reference(w0, GRADS3, lr, (0.9, 0.999), 1e-8, wd, decay or "decoupled",
                               amsgrad, maximize)
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    kwargs = {} if decay is None else {"decay": decay}
    opt = AdamEG([p], lr=lr, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, **kwargs)
    for g in GRADS3:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert p.tolist() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("amsgrad,maximize", [(True, False), (False, True), (True, True)])
def test_adam_gd_options_equal_torch_adamw(amsgrad, maximize):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    ours = AdamGD([p], lr=0.01, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    theirs = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, amsgrad=amsgrad,
                               maximize=maximize)
    for step in range(6):
        g = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        p.grad, q.grad = g * (0.1 if step == 3 else 1.0), g.clone() * (0.1 if step == 3 else 1)
        ours.step()
        theirs.step()
    assert torch.allclose(p, q, rtol=0, atol=1e-15)


def test_gd_sign_by_hand():
    lr, wd, threshold = 0.5, 0.1, 1e-18
    w0 = [0.5, -0.25, 0.1, -0.1, 0.0, 0.3]
    grads = [[0.2, -0.1, 0.4, -0.3, 1.0, 0.6]]
    w = []
    for wi, gi in zip(w0, grads[0], strict=True):
        new = wi - lr * (gi + wd * wi)
        old_sign = math.copysign(1.0, wi) if wi != 0 else 0.0
        new_sign = math.copysign(1.0, new) if new != 0 else 0.0
        w.append(new if new_sign == old_sign else threshold * old_sign)
    assert w[2] == 1e-18 and w[3] == -1e-18 and w[4] == 0.0 and w[5] == 1e-18  # cases hit
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = GDSign([p], lr=lr, weight_decay=wd)
    p.grad = torch.tensor(grads[0], dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx(w, abs=1e-17)
    assert p.tolist()[2:] == [1e-18, -1e-18, 0.0, 1e-18]


def test_gd_sign_preserves_signs_and_its_bias_group_is_plain_gd():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    signs = torch.sign(model.weight.detach()).clone()
    opt = optim.build_for_model("gd_sign", model, bias_lr=0.1, lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(torch.sign(model.weight.detach()), signs)
    assert torch.sign(model.bias.detach()).abs().sum() > 0  # biases crossed zero freely
    assert optim.needs_bias_group("gd_sign")


# -- the registry's bias-group flag and the seed's all-parameters mode ----------------------
def test_needs_bias_group_says_what_it_means():
    assert {n for n in optim.available() if optim.needs_bias_group(n)} == {
        "eg", "adam_eg", "madam", "lns_madam", "gd_sign"}
    assert not hasattr(optim, "is_multiplicative")


@pytest.mark.parametrize("name", ["eg", "adam_eg", "madam", "lns_madam", "gd_sign"])
def test_bias_mode_all_applies_the_optimizer_to_every_parameter(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.nn.init.constant_(model[0].bias, 0.1)
    opt = optim.build_for_model(name, model, bias_lr=0.01, bias_mode="all", lr=LR[name])
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4
    opt_split = optim.build_for_model(name, copy.deepcopy(model), bias_lr=0.01, lr=LR[name])
    assert len(opt_split.param_groups) == 2
    with pytest.raises(ValueError, match="bias_mode='none' is invalid: allowed split, all"):
        optim.build_for_model(name, model, bias_mode="none", lr=LR[name])


def test_decay_form_is_named_in_errors():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="Invalid decay: 'l1'.*sign, l2"):
        optim.build("eg", p, lr=0.1, decay_form="l1")
    with pytest.raises(ValueError, match="Invalid decay: 'sign'.*decoupled, exp"):
        optim.build("adam_eg", p, lr=0.1, decay_form="sign")
    assert optim.defaults("eg")["decay_form"] == "sign"
    assert optim.defaults("adam_eg")["decay_form"] == "decoupled"


def test_a_state_dict_from_before_a_new_group_option_loads():
    # Checkpoints saved before EG had ``decay`` (or AdamEG ``amsgrad``): the constructor's
    # value fills the missing key instead of a KeyError at the first step.
    for cls, missing, kwargs in ((EG, "decay", {"decay": "l2"}), (AdamEG, "amsgrad", {})):
        p = torch.nn.Parameter(torch.randn(3))
        opt = cls([p], lr=0.1, **kwargs)
        p.grad = torch.randn(3)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        for group in saved["param_groups"]:
            del group[missing]
        resumed = cls([p], lr=0.1, **kwargs)
        resumed.load_state_dict(saved)
        resumed.step()
        assert resumed.param_groups[0][missing] == opt.param_groups[0][missing]


def test_adam_eg_decoupled_decay_never_flips_a_sign():
    with pytest.raises(ValueError, match="Invalid lr \\* weight_decay: 2.0"):
        AdamEG([torch.nn.Parameter(torch.ones(2))], lr=2.0, weight_decay=1.0)
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdamEG([p], lr=0.5, weight_decay=1.0)
    opt.param_groups[0]["lr"] = 1.5  # a schedule's peak
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        opt.step()
    AdamEG([p], lr=2.0, weight_decay=1.0, decay="exp")  # exp(-lr wd) > 0 always


def test_gd_sign_threshold_survives_half_precision():
    p = torch.nn.Parameter(torch.tensor([0.01, -0.01], dtype=torch.float16))
    opt = GDSign([p], lr=1.0)
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float16)
    opt.step()
    tiny = torch.finfo(torch.float16).tiny
    assert p.tolist() == [pytest.approx(tiny), pytest.approx(-tiny)]  # not 0: can regrow
    p.grad = torch.tensor([-1.0, 1.0], dtype=torch.float16)
    opt.step()
    assert p.tolist() == [pytest.approx(1.0, abs=1e-3), pytest.approx(-1.0, abs=1e-3)]
