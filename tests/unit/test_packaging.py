"""Packaging facts that can drift: the minimum-versions file follows pyproject's lower bounds, the version has one
source, and the package data that a wheel must carry is found through importlib.resources."""

from __future__ import annotations

import re
from importlib import metadata

import pytest

import fewshot_sla
from fewshot_sla.package_data import published_table, shipped_episode_sets
from fewshot_sla.results import SCHEMA_FILE
from tests.helpers.paths import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
# Where .ci/min_versions.txt may differ from the declared bound, and why (see the file's header).
EXCEPTIONS = {"torch": "only the pinned build is on the CI machine", "pillow": "9.1 and 9.2 have no 3.11 wheels"}


def declared_minimums() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.split(";")[0].strip()).groups()
        bounds[name.lower()] = bound
    return bounds


def pinned_minimums() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "min_versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_the_minimum_versions_file_pins_every_declared_lower_bound() -> None:
    declared, pinned = declared_minimums(), pinned_minimums()
    assert set(pinned) == set(declared) - {"torch"}
    for name, bound in declared.items():
        if name in EXCEPTIONS:
            assert name not in pinned or release(pinned[name]) >= release(bound), name
        else:
            # the pin is the bound itself, or a patch release of it (e.g. 6.0.1 for >=6.0)
            assert release(pinned[name])[: len(release(bound))] == release(bound), (name, bound, pinned[name])


def test_the_version_has_one_source() -> None:
    assert metadata.version("fewshot-sla") == fewshot_sla.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_the_package_data_a_wheel_needs_is_found_through_importlib_resources() -> None:
    sets = sorted(p.name for p in shipped_episode_sets().glob("*.npz"))
    assert "synthetic-test-5w1s15q-1000-seed0.npz" in sets and len(sets) >= 8
    assert published_table().is_file() and SCHEMA_FILE.is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"leaderboard/*.csv", "results.schema.json"} <= set(data["fewshot_sla"])
    assert "*.npz" in data["fewshot_sla.episode_sets"]


def test_the_listed_packages_are_every_code_package_and_the_episode_sets_folder() -> None:
    setuptools = pytest.importorskip("setuptools")
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = setuptools.find_packages(where=str(REPO), include=["fewshot_sla*"])
    assert sorted(tool["packages"]) == sorted([*code, "fewshot_sla.episode_sets"])  # a new subpackage must be listed
    assert tool["package-dir"] == {"fewshot_sla.episode_sets": "episodes"}
    if (REPO / ".git").exists():  # a source checkout (editable install): the sets are read from the top-level folder
        assert shipped_episode_sets().resolve() == (REPO / "episodes").resolve()
