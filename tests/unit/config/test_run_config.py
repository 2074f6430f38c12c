"""RunConfig: YAML round trips, strict keys and types with line numbers, recipes and their scaling."""

from __future__ import annotations

from pathlib import Path
from typing import get_origin

import pytest

from fewshot_sla.cli.messages import CliVoice
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.config.recipes import _parse, add_recipe, apply_recipe, default_val_every, recipe_book
from fewshot_sla.engine.build import regime
from fewshot_sla.errors import UserError, voice
from fewshot_sla.learners.base import PRETRAINING
from tests.helpers.paths import REPO

# The only fields a recipe-resolved configuration may leave empty (init_from/init_checkpoint: the seeded
# initialisation; augment_rotations: off; val_ways/val_shots: the test's; the memory plan resolves the last two).
OPTIONAL_FIELDS = [
    "image_size",
    "episodes_file",
    "train_split",
    "augment_rotations",
    "init_from",
    "init_checkpoint",
    "val_ways",
    "val_shots",
    "micro_batch",
    "checkpointing",
]


def test_yaml_round_trip_keeps_every_field(tmp_path: Path) -> None:
    cfg = RunConfig(
        method="maml",
        ways=10,
        shots=5,
        lr=0.5,
        lr_milestones=[0.5],
        lr_factors=[0.1],
        backbone_options={"hidden": 32},
        amp=True,
        episodes_file="x.npz",
        nesterov=True,
    )
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert list(cfg.to_dict()) == RunConfig.field_names()


def test_partial_file_keeps_defaults_and_converts_ints_to_floats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: metaoptnet-svm\nlr: 1\nlr_milestones: [0.5, 0.75]\nlr_factors: [1, 0.5]\n")
    cfg = load_config(path)
    assert cfg.method == "metaoptnet-svm" and cfg.ways == RunConfig().ways
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.lr_factors == [1.0, 0.5]


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("method: protonet\nways: 5\nwayz: 5\n", "line 3: unknown key 'wayz'"),
        ("method: protonet\nways: [5\n", "line 3"),
        ("ways: five\n", "line 1: 'ways' must be an integer, got 'five'"),
        ("ways: '5'\n", "line 1: 'ways' must be an integer, got '5'"),
        ("ways: 20\nval_ways: '5'\n", "line 2: 'val_ways' must be an integer, got '5'"),
        ("val_shots: 0\n", "line 1: 'val_shots' must be at least 1, got 0"),
        ("lr: .nan\n", "line 1: 'lr' must be a finite number"),
        ("seed: -1\n", "line 1: 'seed' must be at least 0, got -1"),
        ("amp: 1\n", "'amp' must be true or false"),
        ("ways: true\n", "'ways' must be an integer"),
        ("lr_milestones: [0.5, a]\n", "'lr_milestones' must be a number, got 'a'"),
        ("backbone_options: 3\n", "'backbone_options' must be a mapping"),
        ("method:\n", "'method' cannot be empty"),
        ("- a\n- b\n", "must hold a mapping"),
        ("a: b: c\n", "line 1"),
    ],
)
def test_bad_files_name_the_problem_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_updated_rejects_unknown_keys_and_bad_types() -> None:
    with pytest.raises(UserError, match="unknown key 'colour'"):
        RunConfig().updated({"colour": 1})
    with pytest.raises(UserError, match=r"'shots' must be an integer, got 1\.5"):
        RunConfig().updated({"shots": 1.5})
    assert RunConfig().updated({"shots": 5}).shots == 5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"ways": 0}, "'ways' must be at least 2, got 0"),
        ({"ways": 1}, "'ways' must be at least 2, got 1"),
        ({"val_ways": 1}, "'val_ways' must be at least 2, got 1; fix val_ways"),
        ({"val_shots": 0}, "'val_shots' must be at least 1, got 0; fix val_shots"),
        ({"train_episodes": 0}, "'train_episodes' must be at least 1, got 0"),
        ({"lr": float("inf")}, "'lr' must be a finite number"),
        ({"lr_factors": [float("nan")], "lr_milestones": [0.5]}, "lr_factors must hold finite numbers"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda"),
        ({"optimizer": "rmsprop"}, "'optimizer' must be one of 'sgd' or 'adam'"),
        ({"lr": 0.0}, "'lr' must be greater than 0"),
        ({"lr_milestones": [0.5]}, "given together"),
        ({"lr_milestones": [0.7, 0.3], "lr_factors": [0.1, 0.01]}, "increasing fractions"),
        ({"lr_milestones": [1.5], "lr_factors": [0.1]}, "increasing fractions"),
    ],
)
def test_out_of_range_values_are_rejected_in_one_line(change: dict, expected: str) -> None:
    with pytest.raises(UserError) as info:
        RunConfig().updated(change, "command line")
    message = str(info.value)
    assert message.startswith("command line: ") and expected in message and "\n" not in message


def test_command_line_errors_name_the_flag() -> None:
    with pytest.raises(UserError, match=r"fix train_episodes$"):  # the field, outside the CLI's voice
        RunConfig().updated({"train_episodes": 0}, "command line")
    with voice(CliVoice()), pytest.raises(UserError, match="fix --train-episodes"):
        RunConfig().updated({"train_episodes": 0}, "command line")


def test_recipes_fill_only_missing_fields_and_flags_win() -> None:
    cfg = apply_recipe(RunConfig(method="metaoptnet-svm", dataset="miniimagenet", lr=0.05))
    assert cfg.lr == 0.05  # given
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.weight_decay) == ("sgd", 0.9, True, 5e-4)
    assert (cfg.train_shots, cfg.train_queries, cfg.meta_batch) == (15, 6, 8)
    assert cfg.train_episodes == 480_000
    assert cfg.lr_factors == [0.06, 0.012, 0.0024]
    assert cfg.lr_milestones == pytest.approx([1 / 3, 2 / 3, 5 / 6])
    assert apply_recipe(RunConfig(method="metaoptnet-svm", dataset="cifarfs")).train_shots == 5
    assert [k for k, v in cfg.to_dict().items() if v is None] == OPTIONAL_FIELDS


def test_protonet_recipe_trains_with_higher_way_on_real_data_and_test_ways_on_synthetic() -> None:
    assert apply_recipe(RunConfig(dataset="miniimagenet", shots=1)).train_ways == 30
    assert apply_recipe(RunConfig(dataset="miniimagenet", shots=5)).train_ways == 20
    assert apply_recipe(RunConfig(dataset="synthetic", ways=7)).train_ways == 7
    assert apply_recipe(RunConfig(dataset="miniimagenet", train_ways=12)).train_ways == 12


def test_maml_recipe_uses_32_filters_only_on_its_default_backbone() -> None:
    cfg = apply_recipe(RunConfig(method="maml", shots=1))
    assert cfg.backbone == "conv4" and cfg.backbone_options == {"hidden": 32} and cfg.meta_batch == 4
    assert apply_recipe(RunConfig(method="maml", shots=5)).meta_batch == 2
    assert apply_recipe(RunConfig(method="maml", backbone="resnet12")).backbone_options == {}
    assert apply_recipe(RunConfig(method="maml", backbone_options={"hidden": 8})).backbone_options == {"hidden": 8}


def test_protonet_with_resnet12_follows_the_metaoptnet_papers_recipe() -> None:
    cfg = apply_recipe(RunConfig(method="protonet", backbone="resnet12", dataset="miniimagenet"))
    assert (cfg.optimizer, cfg.lr, cfg.meta_batch, cfg.train_shots) == ("sgd", 0.1, 8, 15)
    assert cfg.learner_options == {"scaled": True}
    assert apply_recipe(RunConfig(backbone="resnet12", learner_options={"scaled": False})).learner_options == {
        "scaled": False
    }


def test_half_a_schedule_is_rejected_rather_than_completed_by_the_recipe() -> None:
    with pytest.raises(UserError, match="given together"):
        RunConfig.from_mapping({"lr_milestones": [0.5]})


def test_unknown_method_uses_the_generic_recipe_and_every_recipe_resolves() -> None:
    cfg = apply_recipe(RunConfig(method="someone-elses-learner", shots=3, queries=7))
    assert (cfg.optimizer, cfg.train_shots, cfg.train_queries) == ("adam", 3, 7)
    for method in recipe_book().methods:
        resolved = apply_recipe(RunConfig(method=method))
        empty = {k for k, v in resolved.to_dict().items() if v is None}
        # a constant learning rate needs no schedule span; a decaying one is anchored to its published budget
        constant = [] if resolved.lr_milestones else ["lr_schedule_episodes"]
        # the pretraining regime trains on images of every class: its plan sets train_ways, no episode shape
        images = ["train_ways", "train_shots", "train_queries"] if regime(resolved) == PRETRAINING else []
        assert empty == set(OPTIONAL_FIELDS + constant + images), method


@pytest.mark.parametrize("method", ["protonet", "metaoptnet-svm", "metaoptnet-ridge"])
def test_short_recipes_keep_their_learning_rate_and_published_ones_decay_as_published(method: str) -> None:
    from fewshot_sla.engine.train import lr_factor, total_steps

    short = apply_recipe(RunConfig(method=method, dataset="synthetic"))
    steps = total_steps(short)
    assert short.train_episodes is not None and short.train_episodes < 1000
    assert lr_factor(short, steps - 1, steps) == 1.0  # the default job ends at its full learning rate
    published = apply_recipe(RunConfig(method=method, dataset="miniimagenet"))
    assert published.lr_schedule_episodes == published.train_episodes
    steps = total_steps(published)
    assert published.lr_factors is not None
    assert lr_factor(published, steps - 1, steps) == published.lr_factors[-1]


def test_validation_cadence_scales_with_the_budget() -> None:
    """At least 4 validations per run (every episode on tiny budgets), every 500 episodes in between, 20 per run on
    long budgets: from 2,000 episodes up the cadence (and so the cost of long runs) is what it was before."""
    assert [default_val_every(e) for e in (1, 3, 8, 100, 300, 1200, 1999)] == [1, 1, 2, 25, 75, 300, 499]
    assert default_val_every(2000) == 500 and default_val_every(10_000) == 500
    assert default_val_every(20_000) == 1000 and default_val_every(480_000) == 24_000
    for episodes in range(1, 30_000, 7):
        every = default_val_every(episodes)
        assert 1 <= every <= episodes
        assert -(-episodes // every) >= min(4, episodes)  # validations, the last one at the end of the run
        if episodes >= 2000:  # long runs: every 500 episodes or more, about 20 validations at most
            assert every >= 500 and -(-episodes // every) <= 21
    assert apply_recipe(RunConfig(train_episodes=40)).val_every == 10
    assert apply_recipe(RunConfig(train_episodes=40, val_every=40)).val_every == 40


def test_every_builtin_learner_has_a_recipe_entry() -> None:
    from fewshot_sla.registry import LEARNERS

    assert set(recipe_book().methods) == set(LEARNERS.names())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("train_shots: 15", "train_shots: fifteen"), "recipes.metaoptnet.values: 'train_shots' must be an integer"),
        (("train_queries: 6", "train_querys: 6"), "recipes.metaoptnet.values: unknown key 'train_querys'"),
        (("- recipe: maml\n  maml-fo", "- recipe: mamal\n  maml-fo"), "no recipe called mamal"),
        (("when: {shots: 1}", "when: {queries: 1}"), "cannot match on 'queries'; rules match on: dataset"),
        (("{same_as: ways}", "{same_as: wayz}"), "same_as names no configuration field: 'wayz'"),
    ],
)
def test_a_broken_recipe_file_is_one_line_naming_the_place(change: tuple[str, str], expected: str) -> None:
    from importlib import resources

    text = resources.files("fewshot_sla.config").joinpath("recipes.yaml").read_text()
    assert change[0] in text
    with pytest.raises(UserError) as info:
        _parse(text.replace(change[0], change[1], 1), "recipes.yaml")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_plugin_learner_can_add_its_own_recipe() -> None:
    add_recipe(
        "test-recipe-learner",
        {
            "source": "a test",
            "values": {"optimizer": "sgd", "lr": 0.3, "meta_batch": 2},
            "rules": [{"when": {"dataset": "synthetic"}, "values": {"train_episodes": 9}}],
        },
    )
    try:
        cfg = apply_recipe(RunConfig(method="test-recipe-learner"))
        assert (cfg.optimizer, cfg.lr, cfg.meta_batch, cfg.train_episodes) == ("sgd", 0.3, 2, 9)
        assert cfg.momentum is None  # not set by this recipe
        with pytest.raises(UserError, match="'lr' must be greater than 0"):
            add_recipe("test-recipe-learner-2", {"source": "x", "values": {"lr": -1.0}})
    finally:
        recipe_book().methods.pop("test-recipe-learner")
        recipe_book().recipes.pop("test-recipe-learner")


def test_metaoptnet_schedule_changes_the_lr_at_epochs_20_40_50_of_60() -> None:
    import torch

    from fewshot_sla.engine.train import lr_factor, make_optimizer

    cfg = apply_recipe(RunConfig(method="metaoptnet-svm", dataset="miniimagenet"))
    steps = 60 * 1000  # the published budget: 1000 batches of 8 episodes per epoch
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(cfg, [param])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps))
    seen = {}
    for step in range(steps):
        if step % 1000 == 0:
            seen[step // 1000] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    published = {
        epoch: 0.1 if epoch < 20 else 0.006 if epoch < 40 else 0.0012 if epoch < 50 else 0.00024 for epoch in range(60)
    }
    assert seen == pytest.approx(published)


def test_an_anchored_schedule_follows_the_published_one_for_as_long_as_a_run_lasts() -> None:
    from fewshot_sla.engine.train import lr_factor, total_steps

    base = dict(
        method="protonet",
        dataset="miniimagenet",
        lr_milestones=[k / 10 for k in range(1, 10)],
        lr_factors=[0.5**k for k in range(1, 10)],
        meta_batch=1,
    )
    for episodes, last in ((300, 1.0), (6000, 0.25), (20000, 0.5**9)):
        anchored = apply_recipe(RunConfig(**base, train_episodes=episodes, lr_schedule_episodes=20000))
        steps = total_steps(anchored)
        assert lr_factor(anchored, steps - 1, steps) == pytest.approx(last), episodes
    compressed = apply_recipe(RunConfig(**base, train_episodes=300, lr_schedule_episodes=300))
    assert lr_factor(compressed, 299, 300) == pytest.approx(0.5**9)  # every decay squeezed into 300 episodes


def test_set_overrides_any_field_with_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fewshot_sla.cli import main

    assert (
        main(
            [
                "run",
                "--method",
                "metaoptnet-svm",
                "--set",
                "momentum=0.5",
                "--set",
                "lr_milestones=[0.5]",
                "--set",
                "lr_factors=[0.1]",
                "--print-config",
            ]
        )
        == 0
    )
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cfg = load_config(printed)
    assert (cfg.momentum, cfg.lr_milestones, cfg.lr_factors, cfg.optimizer) == (0.5, [0.5], [0.1], "sgd")
    for flags, expected in (
        (["--set", "momentun=0.5"], "unknown key 'momentun'"),
        (["--set", "momentum=fast"], "--set: 'momentum' must be a number"),
        (["--set", "momentum"], "--set expects KEY=VALUE"),
    ):
        assert main(["run", *flags, "--print-config"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_validation_ways_and_shots_default_to_the_tests_and_round_trip(tmp_path: Path) -> None:
    assert (RunConfig().val_ways, RunConfig().val_shots) == (None, None)
    cfg = RunConfig(ways=20, val_ways=5, val_shots=2)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg and (load_config(path).val_ways, load_config(path).val_shots) == (5, 2)
    # an older config.yaml without them reads as unset
    path.write_text("ways: 20\n")
    assert (load_config(path).val_ways, load_config(path).val_shots) == (None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("method: protonet\nways: 5\nmethod: maml\n", "'method' is given twice (lines 1 and 3); keep one"),
        ("learner_options:\n  scale: 1\n  scale: 2\n", "'scale' is given twice (lines 2 and 3)"),
    ],
)
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("5E-4", 5e-4), ("1e5", 1e5), ("2.E3", 2e3), ("-1.5e-2", -1.5e-2), ("1.0e-3", 1e-3)],
)
def test_numbers_in_exponent_form_are_numbers_in_files_set_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, value: float
) -> None:
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; every way of giving a number takes it as a number."""
    from fewshot_sla.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"weight_decay: {text.lstrip('-')}\nlearner_options:\n  scale: {text}\n")
    cfg = load_config(path)
    assert cfg.weight_decay == abs(value) and cfg.learner_options == {"scale": value}
    for flags in (["--set", f"weight_decay={text.lstrip('-')}"], ["--config", str(path)]):
        assert main(["run", *flags, "--learner-option", f"scale={text}", "--print-config"]) == 0
        printed = tmp_path / "printed.yaml"
        printed.write_text(capsys.readouterr().out)
        resolved = load_config(printed)
        assert resolved.weight_decay == abs(value) and resolved.learner_options == {"scale": value}


def test_exponent_numbers_and_repeated_keys_in_grid_files(tmp_path: Path) -> None:
    from fewshot_sla.config.grid import load_grid

    grid = tmp_path / "grid.yaml"
    variants = "variants:\n  - {transform: none, objective: baseline}\nshots: [1]\n"
    grid.write_text(f"name: g\ndatasets: [synthetic]\nmethods: [protonet]\n{variants}settings:\n  lr: 1e-3\n")
    assert {cell.config.lr for cell in load_grid(grid).cells} == {1e-3}
    grid.write_text(f"name: g\ndatasets: [synthetic]\nmethods: [protonet]\nmethods: [maml]\n{variants}")
    with pytest.raises(UserError, match=r"'methods' is given twice \(lines 3 and 4\)"):
        load_grid(grid)


# The key lists the Knobs replaced, frozen as they were (config.py, config/grid.py, leaderboard/build.py).
OLD_RESUME_FREE_KEYS = ("device", "micro_batch", "checkpointing", "log", "checkpoint_every")
OLD_HASH_FREE_KEYS = ("device", "eval_batch", "feature_cache", "checkpointing", "log", "checkpoint_every")
OLD_UNSET_FREE_KEYS = ("val_ways", "val_shots")
OLD_RESULT_FREE_KEYS = ("seed", "device", "eval_batch", "feature_cache", "episodes_file", "log", "checkpoint_every")


def test_every_field_declares_one_knob_with_consistent_properties() -> None:
    from fewshot_sla.config import base_type, knobs

    assert list(knobs()) == RunConfig.field_names()
    flags = [knob.flag for knob in knobs().values() if knob.flag]
    assert len(flags) == len(set(flags))
    for name, knob in knobs().items():
        assert knob.help and "\n" not in knob.help and "%" not in knob.help, name
        # identity follows the effect on results; 'when_set' only for fields that do change them
        assert (knob.identity == "never") == (not knob.affects_results), name
        if knob.flag:
            mapping = get_origin(base_type(name)) is dict
            assert knob.flag == "--" + (name.removesuffix("s") if mapping else name).replace("_", "-"), name
            assert (knob.metavar is None) == (base_type(name) is bool), name


def test_derived_key_lists_are_the_ones_they_replace_but_checkpointing_no_longer_splits_leaderboard_rows() -> None:
    from fewshot_sla.config import RESUME_FREE_KEYS
    from fewshot_sla.config.grid import HASH_FREE_KEYS, UNSET_FREE_KEYS
    from fewshot_sla.leaderboard.build import RESULT_FREE_KEYS

    assert set(RESUME_FREE_KEYS) == set(OLD_RESUME_FREE_KEYS)
    assert set(HASH_FREE_KEYS) == set(OLD_HASH_FREE_KEYS)
    # Fields added since, unset in every earlier cell, enter only when set (so that no existing cell was renamed).
    added = {"init_from", "init_checkpoint", "train_split", "augment_rotations"}
    assert set(UNSET_FREE_KEYS) == set(OLD_UNSET_FREE_KEYS) | added
    # The one reclassification: activation checkpointing gives bit-identical gradients and BatchNorm statistics
    # (tests/unit/engine/test_scale.py), was already out of the cell identity and free on resume, and now also out of a
    # leaderboard row's setting, so runs whose memory plans differed only in it are seeds of one row.
    assert set(RESULT_FREE_KEYS) == set(OLD_RESULT_FREE_KEYS) | {"checkpointing"}


def test_the_configuration_reference_is_generated_from_the_fields() -> None:
    from fewshot_sla.config import REFERENCE_FILE, REGENERATE_REFERENCE, configuration_reference, knobs

    committed = (REPO / REFERENCE_FILE).read_text()
    assert committed == configuration_reference(), f"{REFERENCE_FILE} is out of date; run: {REGENERATE_REFERENCE}"
    for name in knobs():
        assert f"| `{name}` |" in committed


def test_annotated_yaml_is_the_plain_yaml_plus_comments(tmp_path: Path) -> None:
    cfg = RunConfig(learner_options={"a": {"b": [1, 2], "c": {"d": 3}}}, lr_milestones=[0.5], lr_factors=[0.1])
    notes = {name: f"note {i}" for i, name in enumerate(RunConfig.field_names())}
    text = cfg.to_yaml(notes, header="a header")
    assert text.startswith("# a header\n") and "lr_factors: [0.1]  # note 25\n" in text
    assert "# learner_options: note 6\nlearner_options:\n  a:\n" in text  # a value on several lines: note above
    assert [line.split("  # ")[0] for line in text.splitlines() if not line.startswith("#")] == (
        cfg.to_yaml().splitlines()
    )
    path = tmp_path / "annotated.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
