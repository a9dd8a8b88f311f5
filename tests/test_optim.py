"""Optimization numerics against timm and against the formulas in the RSB fact sheet."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lamb
from timm.scheduler import CosineLRScheduler
from torch import nn

from launcher.models import create_resnet
from launcher.models.optim import (
    create_loss,
    create_optimizer,
    create_scheduler,
    fit_warmup,
    lr_scale_rule,
    param_groups,
    scaled_lr,
)

torch.set_num_threads(2)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    ).double()
    with torch.no_grad():  # no zero tensors: a zero weight norm would disable the trust ratio anyway
        for p in net.parameters():
            p.normal_()
    return net


def _reference_lamb_step(params, grads, state, groups, *, lr, wd, max_norm, step,
                         betas=(0.9, 0.999), eps=1e-6, always_adapt=False):
    """NvLamb written from the fact sheet: global clip, L2 decay in the update, trust ratio only if wd."""
    global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clip = max(global_norm.item() / max_norm, 1.0)
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    for p, g, decayed in zip(params, grads, groups):
        g = g / clip
        m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
        group_wd = wd if decayed else 0.0
        if group_wd:
            update = update + group_wd * p
        ratio = 1.0
        if group_wd or always_adapt:
            w_norm, u_norm = p.norm(), update.norm()
            ratio = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
        p.sub_(lr * ratio * update)


@pytest.mark.parametrize("grad_scale", [1e-3, 50.0])  # global grad norm below 1 (no clip) and far above
def test_lamb_matches_timm_lamb_and_reference_formula(grad_scale):
    lr, wd = 5e-3, 0.02
    ours_net, timm_net, ref_net = _small_net(), _small_net(), _small_net()
    ours = create_optimizer(ours_net, "lamb", lr, wd)
    assert isinstance(ours, Lamb) and ours.defaults["max_grad_norm"] == 1.0 and ours.defaults["eps"] == 1e-6
    timm_opt = Lamb(param_groups(timm_net, wd), lr=lr, weight_decay=0.0)
    ref_params = list(ref_net.parameters())
    decayed = [p.ndim > 1 for p in ref_params]  # conv/linear weights; BN and biases are no-decay
    state: dict = {}
    gen = torch.Generator().manual_seed(1)
    norms = []
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * grad_scale for p in ref_params]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        for net, opt in ((ours_net, ours), (timm_net, timm_opt)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        with torch.no_grad():
            _reference_lamb_step(ref_params, grads, state, decayed, lr=lr, wd=wd, max_norm=1.0, step=step)
    assert (min(norms) > 1.0) if grad_scale > 1 else (max(norms) < 1.0)
    for a, b, c in zip(ours_net.parameters(), timm_net.parameters(), ref_params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_lamb_no_decay_groups_get_no_trust_ratio():
    """The reference with trust ratio on every group (always_adapt) must differ on BN/bias only."""
    net, adapted = _small_net(), _small_net()
    opt = create_optimizer(net, "lamb", 1e-2, 0.05)
    params = list(adapted.parameters())
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    with torch.no_grad():
        _reference_lamb_step(params, grads, {}, [p.ndim > 1 for p in params], lr=1e-2, wd=0.05,
                             max_norm=1.0, step=1, always_adapt=True)
    for (name, p), q in zip(net.named_parameters(), params):
        same = torch.allclose(p, q, rtol=1e-10, atol=1e-12)
        assert same == (p.ndim > 1), name


def test_param_groups_resnet50_decay_exactly_conv_and_fc_weights():
    model = create_resnet("resnet50", 10)
    names = {id(p): n for n, p in model.named_parameters()}
    for opt_name in ("lamb", "adamw", "sgd"):
        opt = create_optimizer(model, opt_name, 1e-3, 0.01)
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        expected = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) for n in [f"{n}.weight"]}
        assert decayed == expected | {"fc.weight"}
        assert plain == set(names.values()) - decayed
        assert all(g["weight_decay"] == 0.01 for g in opt.param_groups if g["params"][0].ndim > 1)
    assert create_optimizer(model, "sgd", 0.1, 1e-4).defaults["nesterov"] is True


def test_frozen_params_are_not_given_to_the_optimizer():
    model = create_resnet("resnet18", 3, trainable_layers=1)
    opt = create_optimizer(model, "lamb", 1e-3, 0.02)
    given = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in given} == {id(model.fc.weight), id(model.fc.bias)}
    model.fc.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(model, "adamw", 1e-3, 0.0)


def _sched_pair(on_updates: bool, updates_per_epoch: int):
    param = nn.Parameter(torch.zeros(1))
    ours_opt = torch.optim.SGD([param], lr=5e-3)
    timm_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5e-3)
    ours = create_scheduler(ours_opt, epochs=300, updates_per_epoch=updates_per_epoch, warmup_epochs=5,
                            warmup_lr=1e-4, min_lr=1e-6, on_updates=on_updates)
    scale = updates_per_epoch if on_updates else 1
    theirs = CosineLRScheduler(timm_opt, t_initial=300 * scale, lr_min=1e-6, warmup_t=5 * scale,
                               warmup_lr_init=1e-4, t_in_epochs=not on_updates)
    return ours, ours_opt, theirs, timm_opt


def _a2_formula(t: float) -> float:
    peak, warm, low = 5e-3, 1e-4, 1e-6
    if t < 5:
        return warm + t * (peak - warm) / 5
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / 300))


def test_schedule_a2_per_epoch_equals_timm_and_formula():
    ours, ours_opt, theirs, timm_opt = _sched_pair(on_updates=False, updates_per_epoch=625)
    assert ours_opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # epoch 0 uses the warmup LR
    for epoch in range(0, 301):
        ours.step_update(num_updates=epoch * 625 + 17)  # no-op when stepping per epoch, as in RSB
        ours.step(epoch)
        theirs.step(epoch)
        lr = ours_opt.param_groups[0]["lr"]
        assert lr == timm_opt.param_groups[0]["lr"]
        assert lr == pytest.approx(_a2_formula(epoch), rel=1e-12, abs=1e-15)
    for epoch, expected in [(1, 1.08e-3), (4, 4.02e-3)]:
        ours.step(epoch)
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_schedule_a2_per_update_equals_timm_and_formula():
    per_epoch = 7
    ours, ours_opt, theirs, timm_opt = _sched_pair(on_updates=True, updates_per_epoch=per_epoch)
    for update in list(range(0, 80)) + list(range(2000, 2101)):
        ours.step(update // per_epoch)  # no-op when stepping per update
        ours.step_update(num_updates=update)
        theirs.step_update(num_updates=update)
        lr = ours_opt.param_groups[0]["lr"]
        assert lr == timm_opt.param_groups[0]["lr"]
        assert lr == pytest.approx(_a2_formula(update / per_epoch), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("on_updates", [False, True])
def test_warmup_not_shorter_than_the_run_is_shortened_to_epochs_minus_one(on_updates: bool) -> None:
    """A3's 5 warmup epochs in a 2-epoch smoke run: 1 warmup epoch, then timm's cosine, and a warning."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("launcher.models.optim")
    logger.addHandler(handler)
    try:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=8e-3)
        sched = create_scheduler(opt, epochs=2, updates_per_epoch=3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6,
                                 on_updates=on_updates)
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert "warmup_epochs=5" in message and "epochs=2" in message and "shortened to 1 epoch" in message
    scale = 3 if on_updates else 1
    reference = CosineLRScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=8e-3), t_initial=2 * scale,
                                  lr_min=1e-6, warmup_t=1 * scale, warmup_lr_init=1e-4, t_in_epochs=not on_updates)
    for t in range(2 * scale):
        if on_updates:
            sched.step_update(num_updates=t)
        else:
            sched.step(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(reference._get_lr(t)[0], rel=1e-12)
    # the last epoch is in the cosine phase: half-way down from the peak
    assert reference._get_lr(1 * scale)[0] == pytest.approx((8e-3 + 1e-6) / 2)
    assert (fit_warmup(5, 5), fit_warmup(5, 1), fit_warmup(2, 3), fit_warmup(0, 1)) == (4, 0, 2, 0)


def test_schedule_rejects_bad_lengths():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        create_scheduler(opt, epochs=5, updates_per_epoch=1, warmup_epochs=-1, warmup_lr=0, min_lr=0)
    with pytest.raises(ValueError, match="updates_per_epoch"):
        create_scheduler(opt, epochs=5, updates_per_epoch=0, warmup_epochs=1, warmup_lr=0, min_lr=0,
                         on_updates=True)


def _mixed_targets(num_classes: int = 10, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    lam = 0.7
    onehot = F.one_hot(labels, num_classes).double()
    smoothing = 0.1
    off = smoothing / num_classes
    dense = onehot * (1 - smoothing) + off
    return torch.randn(batch, num_classes, generator=gen, dtype=torch.float64), \
        lam * dense + (1 - lam) * dense.flip(0)


def test_bce_with_threshold_equals_timm_and_binarised_targets():
    logits, targets = _mixed_targets()
    loss = create_loss("bce", bce_target_thresh=0.2)(logits, targets)
    assert loss == BinaryCrossEntropy(target_threshold=0.2)(logits, targets)
    binary = (targets > 0.2).double()
    assert binary.sum(1).min() >= 1 and binary.sum(1).max() == 2  # lam 0.7 -> both classes positive
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, binary))


def test_soft_ce_equals_timm_and_class_weights_follow_torch():
    logits, targets = _mixed_targets()
    ce = create_loss("ce")
    assert ce(logits, targets) == SoftTargetCrossEntropy()(logits, targets)
    labels = torch.tensor([0, 3, 3, 9, 1, 2, 5, 5])
    smooth = create_loss("ce", smoothing=0.1)
    torch.testing.assert_close(smooth(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    dense = F.one_hot(labels, 10).double() * 0.9 + 0.01
    torch.testing.assert_close(smooth(logits, labels), ce(logits, dense))
    weight = torch.linspace(0.5, 2.0, 10)
    weighted = create_loss("ce", weight=weight)
    expected = -(weight.double() * targets * logits.log_softmax(-1)).sum(1).mean()
    torch.testing.assert_close(weighted(logits, targets), expected)
    bce_w = create_loss("bce", bce_target_thresh=0.2, weight=weight)(logits, targets)
    torch.testing.assert_close(bce_w, F.binary_cross_entropy_with_logits(
        logits, (targets > 0.2).double(), weight=weight.double()))
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("hinge")


def test_scaled_lr_follows_timm_rule():
    assert scaled_lr(5e-3, 2048, 2048, "lamb") == 5e-3
    assert scaled_lr(5e-3, 2048, 512, "lamb") == pytest.approx(2.5e-3)
    assert scaled_lr(1e-3, 256, 1024, "adamw") == pytest.approx(2e-3)
    assert scaled_lr(0.1, 256, 1024, "sgd") == pytest.approx(0.4)
    assert scaled_lr(0.1, 256, 128, "momentum") == pytest.approx(0.05)
    assert [lr_scale_rule(n) for n in ("lamb", "lambc", "adamw", "adabelief", "sgd", "lars")] == \
        ["sqrt", "sqrt", "sqrt", "sqrt", "linear", "linear"]
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0, 256, "sgd")
