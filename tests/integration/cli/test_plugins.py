"""A third-party learner package, installed with pip into a temporary folder, is found through the
`fewshot_sla.plugins` entry point, listed by the CLI, trained with the `sla` objective and passes the plug-ins guide's
test of it (`fewshot_sla.testing.check_learner`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

GUIDE = REPO / "docs" / "guide" / "plugins.md"


def readme_block(first_line: str) -> str:
    """The fenced code block of the plug-ins guide (docs/guide/plugins.md) whose first line is ``first_line`` (the
    plug-in example's files)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.DOTALL)
    matches = [block for block in blocks if block.splitlines()[:1] == [first_line]]
    assert len(matches) == 1, f"docs/guide/plugins.md should hold one code block starting with {first_line!r}"
    return matches[0]


# The plug-ins guide's example plug-in, exactly as printed there: one module, one learner.
PYPROJECT = readme_block("# my-plugin/pyproject.toml")
LEARNER_MODULE = readme_block("# my-plugin/fsl_cosine_protonet.py")
# ... and its test, running the suite's public contract checks (fewshot_sla.testing) on the installed learner.
PLUGIN_TEST = readme_block("# my-plugin/test_fsl_cosine_protonet.py")

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
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        env,
        root,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return env, root


def test_cli_lists_the_plugin_learner(plugin_env):
    env, root = plugin_env
    out = run([sys.executable, "-m", "fewshot_sla", "list", "learners", "--json"], env, root)
    assert "cosine-protonet" in json.loads(out)["learners"]


def test_run_help_lists_the_plugin_learner_with_the_builtins(plugin_env):
    env, root = plugin_env
    out = run([sys.executable, "-m", "fewshot_sla", "run", "--help"], {**env, "COLUMNS": "1000"}, root)
    method = next(line for line in out.splitlines() if line.strip().startswith("--method"))
    assert "cosine-protonet" in method and "protonet" in method.replace("cosine-protonet", "")


def test_the_plugin_learner_trains_with_the_sla_objective(plugin_env):
    env, root = plugin_env
    script = root / "train_plugin.py"
    script.write_text(TRAIN_SCRIPT)
    report = json.loads(run([sys.executable, str(script)], env, root).strip().splitlines()[-1])
    assert report["module"] == "fsl_cosine_protonet"
    assert len(report["losses"]) == 3
    assert all(loss == loss and abs(loss) < float("inf") for loss in report["losses"])
    assert report["changed"]


def test_the_readme_plugin_test_runs_check_learner_on_the_installed_learner(plugin_env):
    """The plug-ins guide's test file for the plug-in, run with pytest as its author would: ``check_learner`` passes."""
    env, root = plugin_env
    assert 'check_learner("cosine-protonet")' in PLUGIN_TEST
    tests = root / "plugin_tests"
    tests.mkdir(exist_ok=True)
    (tests / "test_fsl_cosine_protonet.py").write_text(PLUGIN_TEST)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests), str(tests)]
    out = run(args, {**env, "OMP_NUM_THREADS": "1"}, tests)
    assert "1 passed" in out


def test_without_the_plugin_the_learner_is_unknown():
    """Control: this process never sees the temporary site folder, so the plug-in is what adds the name."""
    from fewshot_sla.registry import LEARNERS

    assert "cosine-protonet" not in LEARNERS.names()


def test_run_help_lists_every_registered_learner_and_objective(capsys, monkeypatch):
    from fewshot_sla.cli import main
    from fewshot_sla.registry import LEARNERS, OBJECTIVES

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option, names unbroken
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")}
    assert f"learner: {', '.join(LEARNERS.names())} (default protonet)" in lines["--method"]
    assert f"training objective: {', '.join(OBJECTIVES.names())} (default sla)" in lines["--objective"]


def test_a_plugin_that_fails_to_load_fails_only_help_and_in_one_line(capsys, monkeypatch):
    from fewshot_sla.cli import main
    from fewshot_sla.errors import UserError
    from fewshot_sla.registry import LEARNERS

    def broken(pattern: str = "*") -> list[str]:
        raise UserError("plug-in 'bad' (bad:register) failed to load: ImportError: no module named bad")

    monkeypatch.setattr(LEARNERS, "names", broken)
    assert main(["list", "datasets"]) == 0  # building the parser loads no plug-in
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err == "fewshot-sla: error: plug-in 'bad' (bad:register) failed to load: ImportError: no module named bad\n"


def test_the_plugin_learner_trains_on_greyscale_omniglot_with_and_without_sla(plugin_env, tmp_path):
    from tests.unit.data.test_omniglot import TINY, _release, _split_dir

    env, root = plugin_env
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "fewshot_sla", "--data-root", str(data)]
    source, splits = _release(tmp_path / "release"), _split_dir(tmp_path / "splits")
    run([*cli, "data", "prepare", "omniglot", "--source", str(source), "--split-dir", str(splits)], env, root)
    for transform, objective in (("none", "baseline"), ("rotation", "sla")):
        out = tmp_path / f"run-{objective}"
        args = ["--transform", transform, "--objective", objective, "--backbone-option", "hidden=8", *TINY]
        run([*cli, "run", "--dataset", "omniglot", "--method", "cosine-protonet", *args, "--out", str(out)], env, root)
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == "cosine-protonet" and results["normalization"]["mean"] == [1.0]


# The plug-ins guide's plug-in transformation and its recipe for a plug-in learner, exactly as printed there.
TRANSFORM_MODULE = readme_block("# my-plugin/fsl_flips.py")
RECIPE_CODE = readme_block("# my-plugin/fsl_cosine_protonet.py, at the end: the learner's own recipe")


def test_the_readme_plugin_transformation_keeps_the_contract(monkeypatch):
    import torch

    from fewshot_sla.registry import TRANSFORMS
    from fewshot_sla.sla import checked_transform

    TRANSFORMS.names()
    monkeypatch.setattr(TRANSFORMS, "_entries", dict(TRANSFORMS._entries))
    exec(compile(TRANSFORM_MODULE, "fsl_flips.py", "exec"), {"__name__": "fsl_flips"})
    for channels in (1, 3):
        transform = checked_transform("flips", channels=channels, image_size=8)
    image = torch.randn(1, 1, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    copies = transform(image)[0]
    assert copies.shape == (4, 3, 4, 6) and torch.equal(copies[0], image[0, 0])
    assert torch.equal(copies[3], image[0, 0].flip(-1).flip(-2))


def test_the_readme_recipe_for_a_plugin_learner_applies():
    from fewshot_sla.config import RunConfig
    from fewshot_sla.config.recipes import apply_recipe, recipe_book, recipe_record

    exec(compile(RECIPE_CODE, "fsl_cosine_protonet.py", "exec"), {"__name__": "fsl_cosine_protonet"})
    try:
        cfg = apply_recipe(RunConfig(method="cosine-protonet", dataset="synthetic", ways=3, shots=2))
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.train_episodes) == ("sgd", 0.05, 0.9, 300)
        assert (cfg.train_ways, cfg.train_shots, cfg.train_queries) == (3, 2, 15)
        assert recipe_record(cfg)["name"] == "cosine-protonet"
        generic = set(recipe_book().recipes["generic"].values)
        assert generic <= set(recipe_book().recipes["cosine-protonet"].values), "the plug-ins guide says: set them all"
    finally:
        recipe_book().methods.pop("cosine-protonet")
        recipe_book().recipes.pop("cosine-protonet")
