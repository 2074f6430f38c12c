"""A third-party learner package, installed with pip into a temporary folder, is found through the
`fewshot_sla.plugins` entry point, listed by the CLI and trained with the `sla` objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The example plug-in: one module, one learner (this is the README example).
LEARNER_MODULE = '''\
"""A cosine-similarity prototype learner for fewshot-sla, registered through a plug-in entry point."""

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.learners.base import EmbeddingLearner
from fewshot_sla.registry import LEARNERS


@LEARNERS.register("cosine-protonet")
class CosineProtoNet(EmbeddingLearner):
    """Class means of the embeddings as prototypes; logits are learnably scaled cosine similarities."""

    def __init__(self, backbone: nn.Module, scale: float = 10.0) -> None:
        super().__init__(backbone)
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def head(self, support_features, support_labels, query_features, ways):
        onehot = F.one_hot(support_labels, ways).to(support_features.dtype)  # [B, S, ways]
        counts = onehot.sum(1).clamp(min=1).unsqueeze(-1)  # [B, ways, 1]
        prototypes = onehot.transpose(1, 2) @ support_features / counts  # [B, ways, D]
        cosine = F.normalize(query_features, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
        return self.log_scale.exp() * cosine  # [B, Q, ways]
'''

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "fsl-cosine-protonet"
version = "0.1.0"
dependencies = ["fewshot-sla"]

[project.entry-points."fewshot_sla.plugins"]
cosine-protonet = "fsl_cosine_protonet"

[tool.setuptools]
py-modules = ["fsl_cosine_protonet"]
"""

# Trains the plug-in learner for a few steps on random 3-way 2-shot episodes and reports as JSON.
TRAIN_SCRIPT = """\
import json

import torch
from torch import nn

from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.registry import LEARNERS, OBJECTIVES

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16))
learner = LEARNERS.create("cosine-protonet", backbone=backbone)
objective = OBJECTIVES.create("sla", transform="rotation", feature_dim=16)
before = [p.detach().clone() for p in learner.parameters()]
optimizer = torch.optim.SGD([*learner.parameters(), *objective.parameters()], lr=0.1)
labels = torch.arange(3).repeat_interleave(2).expand(2, -1)
rows = torch.arange(24).reshape(2, 12)
losses = []
for _ in range(3):
    support, query = torch.randn(2, 2, 6, 3, 8, 8, generator=g)
    episode = EpisodeBatch(support, labels, query, labels, 3, rows[:, :6], rows[:, 6:])
    loss, metrics = objective.loss(learner, episode)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
changed = all(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
print(json.dumps({"losses": losses, "changed": changed, "module": type(learner).__module__}))
"""


def run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run a command; on failure, fail the test with its stderr."""
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """Build and pip-install the example plug-in into a temporary site folder; the env to use it."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("plugin")
    package, site, scratch = root / "fsl-cosine-protonet", root / "site", root / "tmp"
    package.mkdir()
    scratch.mkdir()
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "fsl_cosine_protonet.py").write_text(LEARNER_MODULE)
    env = {**os.environ, "TMPDIR": str(scratch), "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(package)],
        env,
        root,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return env, root


def test_cli_lists_the_plugin_learner(plugin_env):
    env, root = plugin_env
    out = run([sys.executable, "-m", "fewshot_sla", "list", "learners", "--json"], env, root)
    assert "cosine-protonet" in json.loads(out)["learners"]


def test_the_plugin_learner_trains_with_the_sla_objective(plugin_env):
    env, root = plugin_env
    script = root / "train_plugin.py"
    script.write_text(TRAIN_SCRIPT)
    report = json.loads(run([sys.executable, str(script)], env, root).strip().splitlines()[-1])
    assert report["module"] == "fsl_cosine_protonet"
    assert len(report["losses"]) == 3
    assert all(loss == loss and abs(loss) < float("inf") for loss in report["losses"])
    assert report["changed"]


def test_without_the_plugin_the_learner_is_unknown():
    """Control: this process never sees the temporary site folder, so the plug-in is what adds the name."""
    from fewshot_sla.registry import LEARNERS

    assert "cosine-protonet" not in LEARNERS.names()
