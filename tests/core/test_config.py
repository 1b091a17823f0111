"""Configuration: defaults, TOML file, environment overrides, validation messages, the CLI's view of it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Annotated

import pytest
from msgspec import Meta

from appliance import validation
from appliance.config import ConfigError, load_config
from appliance.model_spec import read_model_spec


def test_defaults_bind_loopback():
    config = load_config(None, {})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.source == "defaults"


def test_file_then_environment(tmp_path):
    file = tmp_path / "appliance.toml"
    file.write_text('[server]\nport = 9001\ndrain_timeout_s = 5\n[onnxruntime]\nproviders = ["cpu"]\n')
    config = load_config(file, {"APPLIANCE_SERVER_PORT": "9002", "APPLIANCE_ONNXRUNTIME_PROVIDERS": "cuda,cpu"})
    assert config.server.port == 9002
    assert config.server.drain_timeout_s == 5.0
    assert config.onnxruntime.providers == ["cuda", "cpu"]
    assert str(file) in config.source and "environment" in config.source


def test_config_file_from_environment(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[server]\naccess_log = false\n")
    assert load_config(None, {"APPLIANCE_CONFIG": str(file)}).server.access_log is False


@pytest.mark.parametrize(
    "text,env,fragments",
    [
        ("[server]\nport = 70000\n", {}, ["server.port = 70000", "from 0 to 65535"]),
        ("[server]\nport = 'http'\n", {}, ["server.port = 'http'", "an integer"]),
        ("[server]\nlog_level = 'loud'\n", {}, ["server.log_level", "'debug'"]),
        ("[onnxruntime]\nproviders = ['rocm']\n", {}, ["onnxruntime.providers", "'tensorrt'"]),
        ("[server]\nprot = 1\n", {}, ["unknown setting server.prot", "port"]),
        ("[srever]\nport = 1\n", {}, ["unknown configuration section 'srever'"]),
        ("[server\n", {}, ["not valid TOML"]),
        ("", {"APPLIANCE_SERVER_PORT": "eighty"}, ["server.port = 'eighty'", "APPLIANCE_SERVER_PORT"]),
        ("", {"APPLIANCE_SERVER_ACCESS_LOG": "maybe"}, ["server.access_log", "true or false"]),
        ("", {"APPLIANCE_NOPE_X": "1"}, ["unknown configuration section 'nope'", "APPLIANCE_NOPE_X"]),
    ],
)
def test_bad_values_name_field_value_and_allowed(tmp_path, text, env, fragments):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(file, env)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", {})


def test_cli_config_prints_effective_toml(tmp_path):
    env = {"APPLIANCE_SERVER_PORT": "8123", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "config"], env=env, capture_output=True, text=True,
                         check=True).stdout
    parsed = tomllib.loads(out)
    assert parsed["server"]["port"] == 8123
    assert parsed["server"]["host"] == "127.0.0.1"


def test_cli_rejects_bad_config_with_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"],
                         env={"APPLIANCE_SERVER_PORT": "-1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert run.returncode == 2
    assert "server.port = -1" in run.stderr and "from 0 to 65535" in run.stderr


def test_model_toml_validation(tmp_path):
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        'task = "tensor"\ntier = "small"\naliases = ["mini"]\n[engine]\nintra_op_threads = 2\n'
        "[batching]\nmax_batch_size = 8\npreferred_batch_size = [4, 8]\nmax_queue_delay_microseconds = 100\n"
        '[[inputs]]\nname = "X"\ndatatype = "FP32"\ndims = [-1]\nmax_dims = [16]\n[cost]\nper_compute_second = 0.5\n'
    )
    spec = read_model_spec("m", 1, folder)
    assert spec.batching.preferred_batch_size == [4, 8] and spec.inputs[0].max_dims == [16]
    assert spec.tier == "small" and spec.aliases == ["mini"] and spec.cost.per_compute_second == 0.5
    cases = {
        'task = "magic"\n': "task = 'magic'",
        "[batching]\nmax_batch_size = 4\npreferred_batch_size = [8]\n": "exceed max_batch_size",
        "[batching]\nmax_queue_delay_microseconds = 5\n": "needs max_batch_size > 0",
        "colour = 1\n": "unknown key 'colour'",
        '[[inputs]]\nname = "X"\n': "needs both name and datatype",
        'name = "other"\n': "differs from the folder name",
        '[generation]\nsplit_weights = "fast"\n': "expected one of 'timed', 'split', 'dense'",
    }
    for text, message in cases.items():
        (folder / "model.toml").write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_model_spec("m", 1, folder)


# -- the rules every reader shares (appliance.validation) ----------------------------------------------------------

@dataclass
class Point:
    x: Annotated[int, Meta(ge=0)]
    label: str | None = None


@dataclass
class Shapes:
    points: list[Point] = field(default_factory=list)
    named: dict[str, Point] = field(default_factory=dict)
    pair: tuple[int, ...] = ()
    either: str | list[str] | list[int] = ""  # more than one kind of list: msgspec alone refuses this union
    ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5


def test_any_supported_annotation_is_checked_and_converted():
    shapes = validation.build(Shapes, {"points": [{"x": 1}], "named": {"a": {"x": 2, "label": "A"}}, "pair": [1, 2],
                                       "either": [1, 2], "ratio": 1})
    assert shapes == Shapes([Point(1)], {"a": Point(2, "A")}, (1, 2), [1, 2], 1.0)
    assert isinstance(shapes.ratio, float) and validation.build(Shapes, {"either": ["a"]}).either == ["a"]


@pytest.mark.parametrize("table,kind,path,text", [
    ({"points": [{"x": -1}]}, "value", "points[0].x", "points[0].x = -1 is not allowed: expected an integer >= 0"),
    ({"points": [{}]}, "missing", "points[0].x", "points[0].x is missing: expected an integer >= 0"),
    ({"named": {"a": {"y": 1}}}, "unknown", "named.a.y", "unknown setting named.a.y; [named.a] has: x, label"),
    ({"either": [1, "a"]}, "value", "either",
     "either = [1, 'a'] is not allowed: expected a string or a list of strings or a list of integers"),
    ({"ratio": 0}, "value", "ratio", "ratio = 0 is not allowed: expected a number > 0 and <= 1"),
    ({"pair": [True]}, "value", "pair", "pair = [True] is not allowed: expected a list of integers"),
    ({"points": {"x": 1}}, "value", "points", "points = {'x': 1} is not allowed: expected a list of tables"),
])
def test_errors_carry_the_path_the_value_and_what_is_allowed(table, kind, path, text):
    with pytest.raises(validation.Invalid) as caught:
        validation.build(Shapes, table)
    assert (caught.value.kind, caught.value.path, str(caught.value)) == (kind, path, text)


def test_environment_text_is_parsed_by_the_field_type():
    assert validation.from_text("1, 2,", list[int]) == [1, 2]
    assert validation.from_text("On", bool) is True and validation.from_text("off", bool) is False
    assert validation.from_text(" 5", Annotated[int, Meta(le=1)]) == 5  # the limit is checked afterwards
    assert validation.from_text("x", float) == "x" and validation.from_text("a,x", list[int]) == ["a", "x"]
    config = load_config(None, {"APPLIANCE_SERVER_ACCESS_LOG": "no", "APPLIANCE_ROUTING_ALIASES": "auto, fast",
                                "APPLIANCE_CACHE_TTL_S": "60"})
    assert config.server.access_log is False and config.routing.aliases == ["auto", "fast"]
    assert config.cache.ttl_s == 60.0
