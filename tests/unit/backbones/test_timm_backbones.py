"""timm models as backbones (``--backbone timm:NAME``): the features of timm's own model without its classifier, the
backbone contract, greyscale input, one-line refusals, and a run with SLA on the embedded set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES
from fewshot_sla.testing import check_backbone

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("channels", [3, 1])
def test_the_features_are_timms_model_without_its_classifier(channels: int) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("timm:resnet18", in_channels=channels).eval()
    reference = timm.create_model("resnet18", num_classes=0, in_chans=channels).eval()
    reference.load_state_dict(backbone.model.state_dict())
    images = torch.randn(3, channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), reference(images))
    assert backbone.feature_dim(32) == reference.num_features == 512
    assert not any(isinstance(m, torch.nn.Linear) for m in backbone.modules())  # no classifier


def test_a_timm_backbone_keeps_the_backbone_contract() -> None:
    check_backbone("timm:resnet18")


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("timm:resnet18", {"pretrained": True}, "pretrained weights are refused"),
        ("timm:resnet1800", {}, "timm has no model 'resnet1800'; close names:"),
        ("timm:", {}, "backbone 'timm:' names no model; write timm:NAME"),
        ("timm:resnet18", {"wings": 2}, "timm cannot build 'resnet18' with {'wings': 2}"),
    ],
    ids=["pretrained", "unknown", "empty", "bad-option"],
)
def test_mistakes_are_one_line(name: str, options: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as info:
        BACKBONES.create(name, **options)
    assert "\n" not in str(info.value)


def test_a_run_trains_a_timm_backbone_with_sla_on_the_embedded_set(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--backbone", "timm:resnet18", "--objective", "sla", "--train-episodes", "4", "--val-every", "2"]
    flags += ["--val-episodes", "4", "--eval-episodes", "8", "--image-size", "16", "--device", "cpu", "--quiet"]
    assert main(["--data-root", str(data_root), "run", *flags, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"] == "timm:resnet18"
    assert set(results["evaluation"]["accuracy"]) == {"si", "ag"}


def test_checkpointing_a_timm_backbone_is_refused(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--backbone", "timm:resnet18", "--checkpointing", "--device", "cpu", "--quiet"]
    assert main(["--data-root", str(data_root), "run", *flags, "--out", str(tmp_path / "run")]) == 2
    assert "activation checkpointing is not available here" in capsys.readouterr().err
