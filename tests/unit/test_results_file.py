"""results.json: strict JSON against its shipped JSON Schema (checked by jsonschema, independently of the pydantic
models that write it), null for non-finite numbers, and the main evaluation kept when others are added."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from fewshot_sla.cli import main
from fewshot_sla.results import SCHEMA_FILE, add_evaluation, results_schema, write_results

TINY = ["--device", "cpu", "--quiet", "--train-episodes", "2", "--val-episodes", "4", "--eval-episodes", "6"]
TINY += ["--queries", "3", "--train-queries", "3", "--backbone-option", "hidden=8", "--image-size", "16"]


def strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["--data-root", str(data_root), "run", *TINY, "--out", str(out)]) == 0
    return strict_json((out / "results.json").read_text())  # type: ignore[return-value]


def without_defaults(schema: object) -> object:
    """The schema without ``additionalProperties: true`` (JSON Schema's default, which newer pydantic releases
    write out and older ones leave implicit)."""
    if isinstance(schema, dict):
        return {k: without_defaults(v) for k, v in schema.items() if not (k == "additionalProperties" and v is True)}
    if isinstance(schema, list):
        return [without_defaults(v) for v in schema]
    return schema


def test_the_shipped_schema_is_the_one_the_records_define() -> None:
    regenerate = (
        'python -c "import json; from fewshot_sla.results import results_schema, SCHEMA_FILE; '
        "SCHEMA_FILE.write_text(json.dumps(results_schema(), indent=2) + '\\n')\""
    )
    shipped = without_defaults(json.loads(SCHEMA_FILE.read_text()))
    assert shipped == without_defaults(results_schema()), f"regenerate it: {regenerate}"


def test_a_run_writes_results_that_the_schema_accepts_and_it_rejects_damage(results: dict) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(results, schema)
    for damage in (
        lambda r: r.pop("evaluation"),
        lambda r: r.update(surprise=1),
        lambda r: r["evaluation"]["accuracy"]["ag"].update(mean="high"),
        lambda r: r["evaluation"]["episode_set"].pop("hash"),
        lambda r: r["train"].update(steps=None),
    ):
        damaged = copy.deepcopy(results)
        damage(damaged)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(damaged, schema)


def test_numbers_that_are_not_finite_are_written_as_null(tmp_path: Path, results: dict) -> None:
    odd = copy.deepcopy(results)
    odd["train"]["best_val_accuracy"] = float("-inf")
    odd["evaluation"]["diagnostics"] = {"residual": float("nan")}
    write_results(tmp_path, odd)
    back = strict_json((tmp_path / "results.json").read_text())
    assert back["train"]["best_val_accuracy"] is None  # type: ignore[index]
    assert back["evaluation"]["diagnostics"] == {"residual": None}  # type: ignore[index]
    jsonschema.validate(back, json.loads(SCHEMA_FILE.read_text()))


def test_the_main_evaluation_is_replaced_only_by_one_on_its_own_episode_set(results: dict) -> None:
    from fewshot_sla.results import EvaluationRecord

    main_block = results["evaluation"]
    other = copy.deepcopy(main_block)
    other["episode_set"]["hash"] = "f" * 64
    added = add_evaluation(results, EvaluationRecord.model_validate(other))
    assert added["evaluation"] == main_block and added["evaluations"][-1] == other
    again = copy.deepcopy(main_block)
    again["time_s"] = 123.0
    redone = add_evaluation(added, EvaluationRecord.model_validate(again))
    assert redone["evaluation"] == again and [b["episode_set"]["hash"] for b in redone["evaluations"]] == [
        "f" * 64,
        main_block["episode_set"]["hash"],
    ]
