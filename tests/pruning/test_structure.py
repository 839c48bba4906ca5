"""A freshly built model takes a pruned checkpoint's architecture, or says clearly why it cannot."""

import copy

import pytest
import torch
from torch import nn

from tea_lightning.model.weights import build_model
from tea_lightning.pruning import StructureMismatch, prune, resize_to_state_dict
from tests.pruning.test_pruner import NC, SMALL, randomize_batchnorms


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    model = build_model("yolov5n.yaml", nc=NC)
    randomize_batchnorms(model)
    prune(model, SMALL, 0.3)
    return model.eval()


def shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def test_fresh_model_takes_the_pruned_architecture_and_gives_the_same_outputs(pruned):
    fresh = build_model("yolov5n.yaml", nc=NC)
    differing = {key.rpartition(".")[0] for key, shape in shapes(fresh).items() if shape != shapes(pruned)[key]}
    assert resize_to_state_dict(fresh, pruned.state_dict()) == len(differing) > 50
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    assert torch.allclose(fresh(SMALL)[0], pruned(SMALL)[0])
    first = fresh.model[0].conv
    assert (first.out_channels, fresh.model[0].bn.num_features) == (pruned.model[0].conv.out_channels,) * 2
    assert first.weight.requires_grad


def test_prefixed_keys_of_a_wrapping_module(pruned):
    wrapper, source = nn.Module(), nn.Module()
    wrapper.model, source.model = build_model("yolov5n.yaml", nc=NC), pruned
    state = {**source.state_dict(), "other.weight": torch.zeros(3)}  # keys outside the prefix are not read
    assert resize_to_state_dict(wrapper.model, state, prefix="model.") > 50
    wrapper.load_state_dict(source.state_dict())
    wrapper.eval()
    assert torch.allclose(wrapper.model(SMALL)[0], pruned(SMALL)[0])


def assert_refused(model: nn.Module, state: dict, match: str, prefix: str = "") -> None:
    before = shapes(model)
    with pytest.raises(StructureMismatch, match=match):
        resize_to_state_dict(model, state, prefix)
    assert shapes(model) == before  # checked before anything changed


def test_a_wider_model_is_refused():
    yolov5s = build_model("yolov5s.yaml", nc=NC).state_dict()
    assert_refused(build_model("yolov5n.yaml", nc=NC), yolov5s,
                   r"model\.0\.conv\.weight: the model has \(16, 3, 6, 6\), the checkpoint \(32, 3, 6, 6\).*model yaml")


def test_another_class_count_is_refused(pruned):
    assert_refused(build_model("yolov5n.yaml", nc=80), pruned.state_dict(),
                   r"model\.24\.m\.0\.weight: the model has \(255, .*\(27, .*"
                   r"the checkpoint detects 4 classes, this model 80")
    assert_refused(build_model("yolov5n.yaml", nc=NC), build_model("yolov5n.yaml", nc=80).state_dict(),
                   r"model\.24\.m\.0\.weight.*\(255, .*the checkpoint detects 80 classes, this model 4")


def test_missing_unexpected_and_reshaped_keys_are_refused(pruned):
    fresh = build_model("yolov5n.yaml", nc=NC)
    state = pruned.state_dict()
    missing = {key: value for key, value in state.items() if key != "model.5.bn.running_var"}
    assert_refused(fresh, missing, r"model\.5\.bn\.running_var .*missing from the checkpoint.*nc")
    assert_refused(fresh, {**state, "model.25.weight": torch.zeros(2)}, r"model\.25\.weight .*not in the model")
    flattened = {**state, "model.2.cv1.conv.weight": state["model.2.cv1.conv.weight"].flatten(1)}
    assert_refused(fresh, flattened, r"model\.2\.cv1\.conv\.weight: .*numbers of dimensions")
    forgotten_prefix = {f"model.{key}": value for key, value in state.items()}
    assert_refused(fresh, forgotten_prefix, r"^model\.0\.conv\.weight .*missing")


def test_only_convolutions_and_batch_norms_are_resized():
    assert_refused(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 2)).state_dict(),
                   r"0\.weight: the model has \(4, 4\), the checkpoint \(2, 4\).*not Linear")
    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    assert_refused(grouped, nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).state_dict(), "grouped")
    assert_refused(grouped, nn.Sequential(nn.Conv2d(8, 8, 1, groups=2)).state_dict(), "kernel sizes")


def depthwise_net(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 1), nn.Conv2d(channels, channels, 3, groups=channels),
                         nn.BatchNorm2d(channels), nn.Conv2d(channels, 4, 1))


def test_depthwise_convolutions_keep_one_group_per_channel():
    small, fresh = depthwise_net(5).eval(), depthwise_net(8)
    assert resize_to_state_dict(fresh, small.state_dict()) == 4
    fresh.load_state_dict(small.state_dict())
    assert (fresh[1].in_channels, fresh[1].out_channels, fresh[1].groups, fresh[2].num_features) == (5, 5, 5, 5)
    images = torch.rand(1, 3, 8, 8)
    assert torch.equal(fresh.eval()(images), small(images))


def test_an_unpruned_state_dict_changes_nothing(pruned):
    model = copy.deepcopy(pruned)
    assert resize_to_state_dict(model, pruned.state_dict()) == 0 and shapes(model) == shapes(pruned)
