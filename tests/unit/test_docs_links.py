"""The repository's top-level pages link only to files that exist (the site's own links are checked by
``mkdocs build --strict``)."""

from __future__ import annotations

import re

import pytest

from tests.helpers.paths import REPO

PAGES = ["README.md", "ARCHITECTURE.md", "CONTRIBUTING.md", "CHANGELOG.md", "DEVELOPERS.md"]


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_name_existing_files(page: str) -> None:
    text = (REPO / page).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (REPO / t).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_the_readme_links_into_the_documentation_site() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for page in ("docs/concepts.md", "docs/guide/data.md", "docs/tutorials/first_run.ipynb"):
        assert f"]({page})" in text
