"""YOLOv5's recipe: parameter groups, accumulation, warmup and LR schedule, EMA ramp, loss gains."""

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from tea_lightning.model.recipe import ExponentialMovingAverage, Recipe, accumulation_steps, apply_schedule, build_optimizer, lr_factor, \
    parameter_groups, ramped_ema, warmup_iterations


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=True))


def test_parameter_groups_split_biases_weights_and_norm_weights():
    net = small_net()
    biases, weights, norms = parameter_groups(net, weight_decay=0.1)
    assert {id(p) for p in biases["params"]} == {id(net[0].bias), id(net[1].bias), id(net[2].bias)}
    assert {id(p) for p in weights["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert [id(p) for p in norms["params"]] == [id(net[1].weight)]
    assert (biases["weight_decay"], weights["weight_decay"], norms["weight_decay"]) == (0.0, 0.1, 0.0)


@pytest.mark.parametrize("batch, world, expected", [(8, 1, 8), (4, 1, 16), (16, 1, 4), (8, 2, 4), (64, 2, 1),
                                                    (6, 1, 11)])
def test_accumulation_reaches_the_nominal_batch(batch, world, expected):
    assert accumulation_steps(batch, world, 64) == expected


def test_weight_decay_is_scaled_to_the_accumulated_batch():
    optimizer = build_optimizer(small_net(), Recipe(), batch_size=6, world_size=1)  # 11 x 6 = 66 images a step
    assert optimizer.param_groups[1]["weight_decay"] == pytest.approx(0.0005 * 66 / 64)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    adamw = build_optimizer(small_net(), Recipe(optimizer="AdamW", lr0=0.001), 8, 1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 0.001


def test_lr_factor_linear_and_cosine_go_from_one_to_lrf():
    recipe = Recipe(lrf=0.01)
    assert lr_factor(0, 100, recipe) == 1 and lr_factor(100, 100, recipe) == pytest.approx(0.01)
    assert lr_factor(50, 100, recipe) == pytest.approx(0.505)
    cosine = Recipe(lrf=0.01, cos_lr=True)
    assert lr_factor(0, 100, cosine) == 1 and lr_factor(100, 100, cosine) == pytest.approx(0.01)
    assert lr_factor(50, 100, cosine) == pytest.approx(0.505)
    assert lr_factor(25, 100, cosine) > lr_factor(25, 100, recipe)


def test_warmup_ramps_lr_momentum_and_accumulation():
    recipe = Recipe()
    assert warmup_iterations(40, recipe) == 120 and warmup_iterations(10, recipe) == 100
    optimizer = build_optimizer(small_net(), recipe, batch_size=8, world_size=1)
    assert apply_schedule(optimizer, recipe, 0, 0, 30, 120, 8, 1) == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # biases start high
    assert optimizer.param_groups[1]["lr"] == 0.0 and optimizer.param_groups[1]["momentum"] == pytest.approx(0.8)
    accumulate = apply_schedule(optimizer, recipe, 60, 1, 30, 120, 8, 1)
    target = 0.01 * lr_factor(1, 30, recipe)
    assert accumulate == round(1 + 0.5 * 7)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(target / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx((0.1 + target) / 2)
    assert apply_schedule(optimizer, recipe, 500, 12, 30, 120, 8, 1) == 8
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.01 * lr_factor(12, 30, recipe))] * 3


def test_ema_decay_ramps_up_like_yolov5():
    update = ramped_ema(decay=0.9999, tau=2000)
    for updates in (1, 100, 10_000):
        average, current = [torch.zeros(3)], [torch.ones(3)]
        update(average, current, torch.tensor(updates - 1))
        d = 0.9999 * (1 - math.exp(-updates / 2000))
        assert torch.allclose(average[0], torch.full((3,), 1 - d))
    counters = [torch.tensor([5])]
    update(counters, [torch.tensor([9])], torch.tensor(3))
    assert counters[0].item() == 5  # integer buffers are not averaged


def test_loss_gains_are_scaled_like_train_py():
    hyp = Recipe().loss_hyperparameters(nc=4, num_layers=3, img_size=416)
    assert hyp["box"] == pytest.approx(0.05)
    assert hyp["cls"] == pytest.approx(0.5 * 4 / 80)
    assert hyp["obj"] == pytest.approx((416 / 640) ** 2)


def test_after_a_pruning_step_the_ema_starts_anew_as_yolov5_does_for_new_weights():
    # The average kept the update count of the run before the step: after 20,000 updates its decay is 0.99985, so
    # the just-pruned (collapsed) weights stayed in the validated and saved EMA for thousands of updates.
    net = small_net()
    ema = ExponentialMovingAverage()
    ema._average_model = AveragedModel(net, use_buffers=True, **ema._kwargs)
    ema._average_model.n_averaged.fill_(20000)
    net[0], net[1], net[2] = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)  # a channel pruned away
    ema.follow_structure(net)
    assert int(ema._average_model.n_averaged) == 0
    with torch.no_grad():
        net[2].weight.add_(1.0)  # training moves on
    ema._average_model.update_parameters(net)  # YOLOv5's first update of a new EMA keeps ~all of the new weights
    torch.testing.assert_close(ema._average_model.module[2].weight, net[2].weight, atol=1e-3, rtol=0)


def test_the_ema_is_kept_on_the_device_the_module_trains_on():
    # Lightning builds the average in `setup`, before the strategy moves the module to its GPU; here the "meta"
    # device stands for the GPU this machine does not have
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_net()

    module = Module()
    ema = ExponentialMovingAverage()
    ema.setup(None, module, "fit")
    module.to("meta")
    ema.on_fit_start(None, module)
    assert {p.device.type for p in ema._average_model.parameters()} == {"meta"}


def test_warmup_moves_sgds_momentum_and_leaves_adamws_beta1_as_yolov5_does():
    recipe = Recipe(warmup_momentum=0.8, momentum=0.937)
    sgd = build_optimizer(small_net(), recipe, 8, 1)
    apply_schedule(sgd, recipe, iteration=0, epoch=0, epochs=10, warmup=100, batch_size=8, world_size=1)
    assert all(group["momentum"] == 0.8 for group in sgd.param_groups)
    adamw_recipe = Recipe(optimizer="AdamW", warmup_momentum=0.8, momentum=0.937)
    adamw = build_optimizer(small_net(), adamw_recipe, 8, 1)
    apply_schedule(adamw, adamw_recipe, iteration=0, epoch=0, epochs=10, warmup=100, batch_size=8, world_size=1)
    assert all(group["betas"] == (0.937, 0.999) for group in adamw.param_groups)
