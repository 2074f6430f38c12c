"""Scaling within one process: micro-batches, activation checkpointing, and the memory preflight."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot_sla.backbones.checkpointing import enable
from fewshot_sla.cli import main
from fewshot_sla.data.catalog import open_store
from fewshot_sla.engine.memory import Budget, CreatedBytes, Probe, StepProfile, plan_memory
from fewshot_sla.engine.train import accumulate_gradients
from fewshot_sla.episodes import EpisodeSampler, EpisodeSpec
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES
from tests.helpers.paths import REPO

SIZE = 32


SPEC = EpisodeSpec(5, 2, 3)


def episodes(data_root: Path, count: int, spec: EpisodeSpec = SPEC):
    from fewshot_sla.engine.build import ImagePipeline

    split = open_store("synthetic", data_root).split("train")
    return ImagePipeline(SIZE, SIZE).episode(EpisodeSampler(split, spec, seed=3).sample(count))


def model(method: str, batch_norm: bool, objective: str = "sla", seed: int = 0):
    torch.manual_seed(seed)
    backbone = BACKBONES.create("conv4", hidden=8, batch_norm=batch_norm)
    learner = LEARNERS.create(method, backbone=backbone)
    return learner, OBJECTIVES.create(objective, transform="rotation", feature_dim=backbone.feature_dim(SIZE))


def gradients(learner, objective, batch, micro_batch: int) -> tuple[dict[str, float], list[torch.Tensor]]:
    for p in list(learner.parameters()) + list(objective.parameters()):
        p.grad = None
    metrics = accumulate_gradients(learner, objective, batch, micro_batch, batch.batch_size)
    grads = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
    return metrics, grads


@pytest.mark.parametrize(
    ("method", "batch_norm", "mode", "objective"),
    [
        ("protonet", False, "train", "sla"),
        ("metaoptnet-ridge", False, "train", "sla+sd"),
        ("metaoptnet-svm", False, "train", "sla"),
        ("protonet", True, "eval", "mt"),  # BatchNorm with running statistics: no batch dependence
        ("maml-fo", True, "train", "sla"),  # MAML adapts each episode with its own batch statistics
    ],
)
def test_micro_batches_give_the_one_pass_meta_gradient(data_root, method, batch_norm, mode, objective) -> None:
    batch = episodes(data_root, 4)
    learner, obj = model(method, batch_norm, objective)
    learner.train(mode == "train")
    one_pass = gradients(learner, obj, batch, 4)
    for k in (1, 3):  # 3 leaves a last micro-batch of 1
        chunked = gradients(learner, obj, batch, k)
        assert chunked[0] == pytest.approx(one_pass[0], rel=1e-5, abs=1e-7)
        assert len(chunked[1]) == len(one_pass[1]) > 0
        for a, b in zip(chunked[1], one_pass[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_with_batch_statistics_micro_batches_change_only_the_statistics(data_root) -> None:
    """The documented difference: BatchNorm in training mode normalises each micro-batch by its own statistics."""
    batch = episodes(data_root, 4)
    learner, obj = model("protonet", True)
    learner.train()
    one_pass = gradients(learner, obj, batch, 4)[1]
    chunked = gradients(learner, obj, batch, 1)[1]
    assert max(float((a - b).abs().max()) for a, b in zip(one_pass, chunked)) > 1e-4


@pytest.mark.parametrize(
    ("name", "options"),
    [("conv4", {"hidden": 8}), ("resnet12", {"channels": (8, 8, 16, 16), "drop_rate": 0.2, "dropblock_ramp_steps": 1})],
)
def test_checkpointing_gives_identical_gradients_and_running_statistics(name, options) -> None:
    torch.manual_seed(0)
    plain = BACKBONES.create(name, **options).train()
    checked = copy.deepcopy(plain)
    enable(checked)
    x = torch.randn(6, 3, SIZE, SIZE)
    for net in (plain, checked):
        torch.manual_seed(1)  # the same dropout masks in both; the recomputation replays them
        (net(x) ** 2).sum().backward()
    for (name_, a), b in zip(plain.named_parameters(), checked.parameters()):
        assert torch.equal(a.grad, b.grad), name_
    for (name_, a), b in zip(plain.named_buffers(), checked.buffers()):
        assert torch.equal(a, b), name_  # BatchNorm statistics and batch counters, DropBlock clocks: counted once


def test_maml_refuses_checkpointing_which_would_recompute_with_the_wrong_weights(data_root, tmp_path, capsys) -> None:
    code = main(
        [
            "--data-root",
            str(data_root),
            "run",
            "--method",
            "maml",
            "--checkpointing",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "learner 'maml' adapts functional copies of the weights" in err[0]
    assert not (tmp_path / "run").exists()


# ----- the memory plan -----


def profile(per_episode: float, stages: tuple[float, ...] = (6.0, 2.0), inputs: tuple[float, ...] = (0.5, 0.5)):
    """A step of 10 static + 1 input GiB whose episodes save ``per_episode`` GiB outside the stages and ``stages``
    inside them (no transient buffers)."""
    gib = 2**30
    zeros = (0.0,) * len(stages)
    return StepProfile(
        static=10 * gib,
        inputs=gib,
        fixed=Probe(0.0, zeros, zeros, 0.0, zeros),
        per_episode=Probe(
            per_episode * gib, tuple(s * gib for s in stages), tuple(i * gib for i in inputs), 0.0, zeros
        ),
        stages=len(stages),
    )


def budget(gigabytes: float) -> Budget:
    return Budget(int(gigabytes * 2**30), None, "a test budget")


def plan(learner_name: str, gigabytes: float, mode: str = "auto", micro_batch=None, checkpointing=None):
    learner, _ = model(learner_name, True)
    return plan_memory(profile(1.0), 8, mode, budget(gigabytes), learner, micro_batch, checkpointing, True)


def test_a_step_that_fits_keeps_its_settings() -> None:
    chosen = plan("protonet", 100.0)  # 10 + 1 + 8 * (1 + 8) = 83 GiB
    assert (chosen.micro_batch, chosen.checkpointing) == (8, False)
    assert chosen.estimate == 83 * 2**30


def test_auto_prefers_exact_options_checkpointing_before_batch_statistics_per_chunk() -> None:
    # BatchNorm learner: only the whole meta-batch is exact, so checkpointing (exact) comes first. Its peak is in
    # stage 1's backward: 10 + 1 + 8 * (1 + 6) = 67 GiB.
    chosen = plan("protonet", 80.0)
    assert (chosen.micro_batch, chosen.checkpointing) == (8, True) and chosen.note == ""
    # Then the largest micro-batch that fits, with a note about the per-chunk statistics: 5 with checkpointing
    # (11 + 5 * 7 = 46 GiB) before 4 without (47 GiB).
    chosen = plan("protonet", 50.0)
    assert (chosen.micro_batch, chosen.checkpointing) == (5, True) and "BatchNorm" in chosen.note
    # Without batch statistics every micro-batch is exact: the largest that fits, before checkpointing, no note.
    learner, _ = model("protonet", False)
    chosen = plan_memory(profile(1.0), 8, "auto", budget(50.0), learner, None, None, True)
    assert (chosen.micro_batch, chosen.checkpointing) == (4, False) and chosen.note == ""
    # MAML holds one episode's graph at a time by default (its loop), which fits here.
    assert plan("maml", 50.0).micro_batch == 1


def test_check_mode_refuses_with_the_options_that_would_fit() -> None:
    with pytest.raises(UserError) as err:
        plan("protonet", 50.0, mode="check")
    assert "needs about 83.0 GB" in str(err.value) and "micro_batch 5 checkpointing would need about 46.0 GB" in str(
        err.value
    )
    with pytest.raises(UserError, match="even one episode per backward pass with checkpointing needs about"):
        plan("protonet", 5.0)  # the static part alone does not fit


def test_explicit_settings_are_kept_when_they_fit_and_respected_when_they_do_not() -> None:
    assert plan("protonet", 100.0, micro_batch=2).micro_batch == 2
    chosen = plan("protonet", 80.0, checkpointing=False)  # checkpointing excluded: a smaller micro-batch instead
    assert chosen.checkpointing is False and chosen.micro_batch < 8


# ----- the preflight, end to end -----

SVM = [
    "run",
    "--method",
    "metaoptnet-svm",
    "--train-episodes",
    "16",
    "--val-every",
    "16",
    "--val-episodes",
    "4",
    "--eval-episodes",
    "4",
    "--device",
    "cpu",
    "--quiet",
    "--backbone-option",
    "hidden=8",
]


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(data_root, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        ["--data-root", str(data_root), *SVM, "--out", str(out), "--memory-budget", "0.001", "--fit-memory", "check"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "memory budget is 0.0 GB (--memory-budget)" in err[0]
    assert not out.exists()


def test_auto_fits_the_step_into_the_budget_and_records_the_plan(data_root, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    # The whole 8-episode step needs about 0.5 GB here: 0.2 GB leaves room for a few episodes at a time.
    assert main(["--data-root", str(data_root), *SVM, "--out", str(out), "--memory-budget", "0.2"]) == 0, (
        capsys.readouterr().err
    )
    memory = json.loads((out / "results.json").read_text())["memory"]
    assert memory["micro_batch"] < 8 and memory["estimated_step_bytes"] <= 0.2 * 2**30
    assert memory["budget"] == "--memory-budget" and memory["measured_peak_bytes"] > 0
    stored = (out / "config.yaml").read_text()
    assert f"micro_batch: {memory['micro_batch']}\n" in stored and "checkpointing: " in stored


def test_checkpointing_on_a_backbone_that_cannot_take_it_is_one_line(data_root, tmp_path, capsys) -> None:
    class Plain(torch.nn.Module):
        def feature_dim(self, image_size: int) -> int:
            return 3 * image_size * image_size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    BACKBONES.add("test-plain-backbone", Plain)
    try:
        flags = [*SVM[:-2], "--backbone", "test-plain-backbone", "--checkpointing", "--out", str(tmp_path / "run")]
        code = main(["--data-root", str(data_root), *flags])
    finally:
        BACKBONES._entries.pop("test-plain-backbone")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "backbone 'test-plain-backbone' does not support it" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--micro-batch", "9"], "--micro-batch 9 is above the meta-batch of 8 episodes; use --micro-batch 8 or fewer"),
        (["--micro-batch", "0"], "'micro_batch' must be at least 1"),
        (["--sync-batchnorm"], "--sync-batchnorm synchronises BatchNorm across processes on GPUs"),
        (["--fit-memory", "sometimes"], "--fit-memory must be one of auto, check, off"),
        (["--memory-budget", "-2"], "--memory-budget must be a positive number of GB"),
    ],
)
def test_bad_scale_options_are_one_line(data_root, tmp_path, capsys, flags, expected) -> None:
    code = main(["--data-root", str(data_root), *SVM, "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


MEASURE = """
import json, sys, torch
from fewshot_sla.config import RunConfig
from fewshot_sla.data.catalog import open_store
from fewshot_sla.engine.build import build_model, episode_specs, pipeline_for
from fewshot_sla.engine.memory import PeakMeter, profile_step
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.engine.train import accumulate_gradients, make_optimizer
from fewshot_sla.episodes import EpisodeSampler
cfg = apply_recipe(RunConfig(method="protonet", train_ways=20, train_queries=10, device="cpu"))
store = open_store("synthetic", sys.argv[1])
pipeline = pipeline_for(cfg, store)
learner, objective = build_model(cfg, pipeline.image_size, torch.device("cpu"))
sampler = EpisodeSampler(store.split("train"), episode_specs(cfg)[0], seed=1)
estimate = profile_step(learner, objective, sampler, pipeline, 1, "adam", 0.0, False).estimate(1, False)
optimizer = make_optimizer(cfg, list(learner.parameters()))
meter = PeakMeter(torch.device("cpu"))
meter.start()
accumulate_gradients(learner.train(), objective, pipeline.episode(sampler.sample(1)), 1, 1)
optimizer.step()
print(json.dumps({"estimate": estimate, "measured": meter.peak() - meter.baseline}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_the_estimate_is_within_the_measured_accuracy_of_a_real_step(data_root) -> None:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(data_root)], capture_output=True, text=True, check=True)
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    # benchmarks/bench_scale.py: the estimate lies within 0.8-1.4x of the measured step peak.
    assert 0.7 < numbers["estimate"] / numbers["measured"] < 1.5, numbers


def _bench(*args: str) -> str:
    script = REPO / "benchmarks" / "bench_scale.py"
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_scale_benchmark_smoke_mode_measures_the_micro_batch_table() -> None:
    out = _bench("--case", "paper", "--tiny", "--options", "2:on,1:off,1:on", "--threads", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("2", "True"), ("1", "False"), ("1", "True")]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)  # measured peak and time of each


@pytest.mark.slow
def test_scale_benchmark_smoke_mode_compares_process_layouts(data_root) -> None:
    out = _bench("--case", "processes", "--tiny", "--data-root", str(data_root))
    assert "2 processes x 1 thread" in out and "x 1 x 1" in out


def test_created_bytes_count_new_storage_only() -> None:
    """Against a count by hand: a matmul, a sum and a concatenation make new tensors; a view, a transpose and an
    in-place ReLU do not; a tensor freed inside the block still counts (the sum bounds the peak from above)."""
    a = torch.randn(30, 20)
    with CreatedBytes() as created:
        product = a @ a.T  # 30 x 30 float32
        product.view(-1)
        product.t()
        product.relu_()
        shifted = product + 1  # 30 x 30
        del shifted
        torch.cat([a, a]).to(torch.float64)  # 60 x 20 float32, then 60 x 20 float64
    assert created.bytes == 4 * (30 * 30 + 30 * 30 + 60 * 20) + 8 * 60 * 20
