"""One pruning step of YOLOv5n: sizes, rounding, the head, BatchNorm statistics, criteria, ratios, bad arguments."""

import copy
import math

import pytest
import torch
from torch import nn

from tea_lightning.model.complexity import count_parameters
from tea_lightning.model.weights import build_model, read_model, read_weights, transfer_weights
from tea_lightning.pruning import PruneResult, make_importance, output_channels, prune, ratio_for_macs
from tea_lightning.pruning.pruner import SparsityRegularizer
from tea_lightning.pruning.structure import detect_output_convs
from tests.conftest import YOLOV5N, need

NC = 4
HEAD_OUTPUTS = 3 * (NC + 5)  # anchors per level x (classes + box + objectness)
IMAGES = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
SMALL = IMAGES[..., :64, :64]


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm distinct weights and statistics, as a trained model has (fresh ones are all 1 or 0)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        for tensor in (bn.weight.data, bn.bias.data, bn.running_mean):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)
        bn.weight.data.add_(1)


@pytest.fixture(scope="module")
def yolov5n() -> nn.Module:
    model = build_model("yolov5n.yaml", nc=NC)
    randomize_batchnorms(model)
    return model


@pytest.fixture
def model(yolov5n) -> nn.Module:
    return copy.deepcopy(yolov5n)


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def reductions(result: PruneResult) -> tuple[float, float]:
    return 1 - result.params_after / result.params_before, 1 - result.macs_after / result.macs_before


def backward(model: nn.Module, images: torch.Tensor = SMALL) -> None:
    model.train()
    sum(output.square().mean() for output in model(images)).backward()


def test_a_channel_ratio_removes_about_its_square_of_params_and_macs(model):
    params = count_parameters(model)
    result = prune(model, IMAGES, 0.3, round_to=None)
    assert result.params_before == params and result.params_after == count_parameters(model)
    params_reduction, macs_reduction = reductions(result)
    assert 0.40 < params_reduction < 0.60 and 0.40 < macs_reduction < 0.60  # 1 - 0.7^2 = 0.51


def test_rounded_channels_keep_the_head_and_a_model_that_trains(model):
    before = {name: conv.out_channels for name, conv in convs(model).items()}
    model.eval()
    eval_shape = model(IMAGES)[0].shape
    model.train()
    train_shapes = [output.shape for output in model(IMAGES)]
    prune(model, IMAGES, 0.3, round_to=8)
    after = {name: conv.out_channels for name, conv in convs(model).items()}
    changed = [name for name in before if after[name] != before[name]]
    assert len(changed) > 40 and all(after[name] % 8 == 0 for name in changed)
    assert [after[f"model.24.m.{i}"] for i in range(3)] == [HEAD_OUTPUTS] * 3
    assert model.training and [output.shape for output in model(IMAGES)] == train_shapes
    backward(model, IMAGES)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    model.eval()
    assert model(IMAGES)[0].shape == eval_shape


def is_subsequence(part: list[float], whole: list[float]) -> bool:
    positions = [whole.index(value) for value in part]
    return positions == sorted(set(positions))


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_statistics_and_mode_survive_except_for_removed_channels(model, training):
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = {name: (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
              for name, bn in bns.items()}
    model.train(training)
    prune(model, IMAGES, 0.3)
    assert model.training == training
    assert any(len(bn.running_mean) < len(before[name][0]) for name, bn in bns.items())
    for name, bn in bns.items():
        mean, var, batches = before[name]
        assert is_subsequence(bn.running_mean.tolist(), mean) and is_subsequence(bn.running_var.tolist(), var)
        assert int(bn.num_batches_tracked) == batches


def test_sync_batchnorm_is_pruned_with_its_convolution(model):
    # --trainer.sync_batchnorm true converts every BatchNorm2d before the first pruning step
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    prune(model, IMAGES, 0.3)
    for module in model.modules():
        if hasattr(module, "conv") and isinstance(getattr(module, "bn", None), nn.SyncBatchNorm):
            assert module.bn.weight.shape[0] == module.bn.running_mean.shape[0] == module.conv.out_channels
    assert model.model[0].conv.out_channels < 16


def test_frozen_half_precision_model_is_pruned_and_stays_so(model):
    """Official checkpoints hold frozen float16 weights, through which autograd traces nothing."""
    model.half().requires_grad_(False)
    model.model[0].requires_grad_(True)
    result = prune(model, SMALL, 0.3)
    assert result.params_after < 0.6 * result.params_before
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "model.0.conv.weight", "model.0.bn.weight", "model.0.bn.bias"}


def test_the_model_of_an_official_yolov5_pt_keeps_its_head_and_runs():
    # the .pt unpickles its head as models.yolo.Detect, not the yolov5 package's class: the head's outputs were
    # pruned (255 -> 176 channels) and the forward pass failed
    official = read_model(need(YOLOV5N), "model")
    heads = [conv.out_channels for conv in detect_output_convs(official)]
    assert heads == [255, 255, 255]
    result = prune(official, SMALL, 0.3)
    assert result.params_after < 0.6 * result.params_before
    assert [conv.out_channels for conv in detect_output_convs(official)] == heads
    with torch.no_grad():
        assert official.float().eval()(SMALL)[0].shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 85)


@pytest.mark.parametrize("importance", ["l2", "l1", "lamp", "bn_scale", "random", "taylor"])
def test_every_importance_prunes_and_is_deterministic(model, importance):
    twin = copy.deepcopy(model)
    if importance == "taylor":
        backward(model)
        backward(twin)
    result = prune(model, SMALL, 0.3, importance=importance, round_to=None)
    prune(twin, SMALL, 0.3, importance=importance, round_to=None)
    assert 0.4 < reductions(result)[0] < 0.6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_random_importance_follows_the_seed(model):
    other = copy.deepcopy(model)
    prune(model, SMALL, 0.3, importance="random", seed=1)
    prune(other, SMALL, 0.3, importance="random", seed=2)
    assert not torch.equal(model.model[0].conv.weight, other.model[0].conv.weight)


def test_global_pruning_ranks_all_layers_together(model):
    before = {name: conv.out_channels for name, conv in convs(model).items()}
    result = prune(model, SMALL, 0.3, global_pruning=True, importance="lamp", round_to=None)
    kept = [conv.out_channels / before[name] for name, conv in convs(model).items() if not name.startswith("model.24")]
    assert 0.3 < reductions(result)[0] < 0.7 and max(kept) - min(kept) > 0.2  # unlike local pruning's 0.7 each


def test_l2_removes_the_channels_with_the_smallest_weights(model):
    weak = [1, 4, 7, 10, 13]  # 16 channels x 0.3 -> 5 removed
    conv, bn, following = model.model[0].conv, model.model[0].bn, model.model[1].conv
    conv.weight.data[weak] *= 1e-3
    bn.weight.data[weak] *= 1e-3
    following.weight.data[:, weak] *= 1e-3
    strong = [i for i in range(16) if i not in weak]
    expected = conv.weight.data[strong].clone()
    prune(model, SMALL, 0.3, importance="l2", round_to=None)
    assert torch.equal(model.model[0].conv.weight, expected)


def batchnorm_scale_kept(model: nn.Module, importance: str) -> float:
    """Return the share of the BatchNorm scales' squared sum that a copy of `model` keeps through 0.3 pruning."""
    def mass(m: nn.Module) -> float:
        return sum(float(bn.weight.square().sum()) for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    pruned = copy.deepcopy(model)
    prune(pruned, SMALL, 0.3, importance=importance, round_to=None)
    return mass(pruned) / mass(model)


@pytest.mark.parametrize("importance", ["l2", "bn_scale"])
def test_sparsity_shrinks_the_channels_that_pruning_removes(model, importance):
    before = batchnorm_scale_kept(model, importance)
    regularizer = SparsityRegularizer(model, SMALL, 0.02, importance)
    for _ in range(20):  # plain gradient descent on the penalty alone
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        regularizer.regularize()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= parameter.grad
    assert batchnorm_scale_kept(model, importance) > before + 0.05  # pruning now removes less of the weights


def test_sparsity_must_be_positive(model):
    with pytest.raises(ValueError, match="sparsity must be > 0"):
        SparsityRegularizer(model, SMALL, 0.0)


def test_taylor_without_gradients_asks_for_a_backward_pass(model):
    with pytest.raises(ValueError, match="taylor.*gradients"):
        prune(model, SMALL, 0.3, importance="taylor")


@pytest.mark.parametrize("global_pruning", [False, True])
def test_extreme_ratio_leaves_every_layer_a_share_of_its_channels(model, global_pruning):
    before = {name: conv.out_channels for name, conv in convs(model).items()}
    prune(model, SMALL, 0.95, global_pruning=global_pruning, round_to=None, max_layer_ratio=0.9)
    after = {name: conv.out_channels for name, conv in convs(model).items()}
    assert all(after[name] >= max(1, math.ceil(0.1 * before[name])) for name in before)
    assert sum(after.values()) < 0.2 * sum(before.values())
    model.eval()
    assert model(SMALL)[0].shape[-1] == NC + 5


def test_small_steps_round_to_the_nearest_multiple(model):
    before = {name: conv.out_channels for name, conv in convs(model).items()}
    prune(model, SMALL, 0.05, round_to=8)
    after = {name: conv.out_channels for name, conv in convs(model).items()}
    assert all(after[name] == before[name] for name in before if before[name] <= 32)  # 32 x 0.95 -> 30 -> 32
    assert after["model.8.cv3.conv"] == 240  # 256 x 0.95 -> 243 -> 240


def test_ignored_layers_keep_their_channels(model):
    before = {name: conv.out_channels for name, conv in convs(model).items()}
    prune(model, SMALL, 0.5, ignored_names=["model.0", "model.8"])
    after = {name: conv.out_channels for name, conv in convs(model).items()}
    kept = [name for name in before if name.startswith(("model.0.", "model.8."))]
    assert len(kept) == 6 and all(after[name] == before[name] for name in kept)
    assert after["model.1.conv"] < before["model.1.conv"]


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_ratio_outside_zero_one_is_refused(model, ratio):
    with pytest.raises(ValueError, match="pruning_ratio"):
        prune(model, SMALL, ratio)


def test_unknown_options_are_refused(model):
    with pytest.raises(ValueError, match="importance.*l2, l1, taylor"):
        make_importance("l3")
    with pytest.raises(ValueError, match="'model.99'.*model.0"):
        prune(model, SMALL, 0.3, ignored_names=["model.99"])
    with pytest.raises(ValueError, match="max_layer_ratio"):
        prune(model, SMALL, 0.3, max_layer_ratio=1.0)


@pytest.mark.parametrize("round_to", [8, None])
def test_iterative_steps_end_with_the_channels_of_one_step(yolov5n, round_to):
    once, stepwise = copy.deepcopy(yolov5n), copy.deepcopy(yolov5n)
    prune(once, SMALL, 0.3, round_to=round_to)
    original = output_channels(stepwise)
    for k in range(1, 6):  # 6% of the original channels each: under 8 of a 16- or 32-channel layer
        prune(stepwise, SMALL, 0.3 * k / 5, round_to=round_to, original_channels=original)
    assert output_channels(stepwise) == output_channels(once)


def test_global_iterative_steps_remove_about_the_total(yolov5n):
    once, stepwise = copy.deepcopy(yolov5n), copy.deepcopy(yolov5n)
    prune(once, SMALL, 0.3, global_pruning=True, round_to=None)
    original = output_channels(stepwise)
    for k in (1, 2, 3):
        prune(stepwise, SMALL, 0.1 * k, global_pruning=True, round_to=None, original_channels=original)
    assert sum(output_channels(stepwise).values()) == pytest.approx(sum(output_channels(once).values()), rel=0.02)


def test_ratio_for_macs_hits_the_target_without_touching_the_model(model):
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ratio = ratio_for_macs(model, SMALL, 0.6, round_to=None)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes and model.training
    # one channel of YOLOv5n's first, full-resolution layers moves the MACs by up to 3%: 0.01 is not always reachable
    assert reductions(prune(model, SMALL, ratio, round_to=None))[1] == pytest.approx(0.6, abs=0.02)


def test_official_weights_prune_and_run():
    model = build_model("yolov5n.yaml", nc=NC)
    transferred, _ = transfer_weights(model, read_weights(need(YOLOV5N))[0])
    assert transferred > 300
    result = prune(model, IMAGES, 0.3)
    assert 0.4 < reductions(result)[0] < 0.6
    model.eval()
    assert model(IMAGES)[0].shape[-1] == NC + 5
