"""The Registry type, the built-in registries, plug-in loading through entry points, and `list`."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint

import pytest

from fewshot_sla import registry
from fewshot_sla.cli import main
from fewshot_sla.errors import UserError
from fewshot_sla.registry import OBJECTIVES, PLUGIN_GROUP, TRANSFORMS, Registry


def widgets() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register()
    def maml():
        return "maml"

    @reg.register("maml-fo")
    def first_order():
        return "maml-fo"

    reg.add("protonet", dict)
    return reg


def test_register_uses_the_given_name_or_the_object_name():
    reg = widgets()
    assert reg.names() == ["maml", "maml-fo", "protonet"]
    assert reg.get("maml")() == "maml" and reg.get("maml-fo")() == "maml-fo"
    assert "protonet" in reg and "proto" not in reg
    assert [name for name, _ in reg.items()] == ["maml", "maml-fo", "protonet"]


def test_names_take_shell_wildcards():
    reg = widgets()
    assert reg.names("maml*") == ["maml", "maml-fo"]
    assert reg.names("*net") == ["protonet"]
    assert reg.names("maml-??") == ["maml-fo"]
    assert reg.names("[mp]*") == ["maml", "maml-fo", "protonet"]
    assert reg.names("svm*") == []


def test_create_passes_keyword_options():
    assert widgets().create("protonet", hidden=64, ways=5) == {"hidden": 64, "ways": 5}


def test_unknown_name_is_a_one_line_user_error_listing_the_valid_names():
    with pytest.raises(UserError) as info:
        widgets().get("protonett")
    message = str(info.value)
    assert "\n" not in message
    assert "widget 'protonett'" in message
    assert "maml, maml-fo, protonet" in message
    with pytest.raises(UserError, match="none registered"):
        Registry("gadget").get("anything")


def test_a_family_makes_its_entries_on_first_use_and_lists_only_its_pattern():
    reg, made = widgets(), []

    def make(name: str):
        if name == "bad":
            raise UserError("no such widget model")
        made.append(name)
        return {"model": name}

    reg.add_family("kit", make)
    assert "kit:anything" in reg and "kat:anything" not in reg
    first = reg.get("kit:small")
    assert first == {"model": "small"} and reg.get("kit:small") is first and made == ["small"]
    assert reg.names() == ["maml", "maml-fo", "protonet"]  # made entries are not listed
    with pytest.raises(UserError, match="no such widget model"):
        reg.get("kit:bad")
    with pytest.raises(UserError, match="widget 'kit:' names no model; write kit:NAME"):
        reg.get("kit:")
    with pytest.raises(UserError, match="choose one of: maml, maml-fo, protonet, kit:NAME"):
        reg.get("protonett")


def test_duplicate_names_are_rejected_unless_overridden():
    reg = widgets()
    original = reg.get("protonet")
    reg.add("protonet", original)  # the same object again is harmless
    with pytest.raises(UserError) as info:
        reg.add("protonet", list)
    message = str(info.value)
    assert "\n" not in message and "registered twice" in message
    assert "builtins.dict" in message and "builtins.list" in message
    assert reg.get("protonet") is original
    reg.add("protonet", list, override=True)
    assert reg.get("protonet") is list


def test_builtin_registries_hold_the_sla_transforms_and_objectives():
    assert {
        "none",
        "rotation",
        "rotation2",
        "color_perm",
        "color_perm3",
        "rot_color_perm12",
        "rot_color_perm24",
    } <= set(TRANSFORMS.names())
    assert {"baseline", "da", "mt", "sla", "sla+sd"} <= set(OBJECTIVES.names())
    assert OBJECTIVES.names("sla*") == ["sla", "sla+sd"]
    assert set(registry.ALL_REGISTRIES) == {"datasets", "backbones", "learners", "transforms", "objectives", "loggers"}


@pytest.fixture
def fake_plugins(monkeypatch, tmp_path):
    """Point plug-in discovery at chosen entry points, with a fresh load flag and a restorable TRANSFORMS."""
    TRANSFORMS.names()  # built-ins first, so that only the plug-in's own entries are added below
    monkeypatch.setattr(TRANSFORMS, "_entries", dict(TRANSFORMS._entries))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules: list[str] = []

    def install(points: list[tuple[str, str]], source: str = "") -> None:
        if source:
            (tmp_path / "fsl_fake_plugin.py").write_text(source)
            modules.append("fsl_fake_plugin")
        eps = [EntryPoint(name, value, PLUGIN_GROUP) for name, value in points]
        monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == PLUGIN_GROUP else [])

    yield install
    for name in modules:
        sys.modules.pop(name, None)


PLUGIN_SOURCE = """
from fewshot_sla.registry import TRANSFORMS
from fewshot_sla.sla import Transformation

CALLS = []
TRANSFORMS.add("{name}", Transformation("{name}", (lambda x: x,)))

def setup():
    CALLS.append("setup")
"""


def test_plugins_load_once_from_module_and_callable_entry_points(fake_plugins):
    fake_plugins(
        [("mod", "fsl_fake_plugin"), ("hook", "fsl_fake_plugin:setup")],
        PLUGIN_SOURCE.format(name="plugin-identity"),
    )
    assert "plugin-identity" in TRANSFORMS.names("plugin-*")
    assert sys.modules["fsl_fake_plugin"].CALLS == ["setup"]
    assert registry.load_plugins() == []  # already loaded: nothing happens twice
    assert sys.modules["fsl_fake_plugin"].CALLS == ["setup"]


def test_a_broken_plugin_is_a_one_line_user_error(fake_plugins):
    fake_plugins([("broken", "fsl_no_such_module_anywhere")])
    with pytest.raises(UserError) as info:
        registry.load_plugins()
    message = str(info.value)
    assert "\n" not in message and "'broken'" in message and "uninstall" in message


def test_a_plugin_reusing_a_builtin_name_names_both_modules(fake_plugins):
    fake_plugins([("clash", "fsl_fake_plugin")], PLUGIN_SOURCE.format(name="rotation"))
    with pytest.raises(UserError) as info:
        registry.load_plugins()
    message = str(info.value)
    assert "\n" not in message and "plug-in 'clash'" in message
    assert "transform 'rotation' is registered twice" in message
    assert "fewshot_sla.sla.rotation" in message and "Transformation object" in message


def test_list_command_filters_and_prints_json(capsys):
    assert main(["list", "transforms", "--pattern", "rot*"]) == 0
    assert capsys.readouterr().out.strip() == ("transforms: rot_color_perm12, rot_color_perm24, rotation, rotation2")
    assert main(["list", "objectives", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["objectives"]) >= {"baseline", "sla", "sla+sd"}


def test_list_command_rejects_an_unknown_kind_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["list", "gizmos"])
    assert info.value.code == 2
    assert "gizmos" in capsys.readouterr().err
