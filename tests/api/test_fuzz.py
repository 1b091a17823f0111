"""Schemathesis over the served OpenAPI document: every operation, against a real server with real models.

Schemathesis's engine runs its coverage phase (the document's boundary values and one violation at a time) and a
bounded, derandomized fuzzing phase for every operation, positive and negative cases alike. Every answer must be a
non-5xx whose status, content type, headers and body are what the document gives for that operation; a request the
document allows must not get a 400, and one it forbids must not get a 2xx. Most cases are aimed at a model the
server really serves (with the model's own tensor names), so that they reach the models' checks and not only the
404 for an unknown name.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import schemathesis.engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

from appliance.keys import KeyStore
from conftest import RunningServer, make_config

FUZZ_EXAMPLES = 25  # per operation, in the fuzzing phase; the coverage phase adds its own deterministic cases
MAX_TOKENS = 4  # generation cases stay short: a larger (or absent) max_tokens is lowered to this
TENSOR_INPUTS = {"add_one": ["INPUT0"], "int_double": ["IDS"], "two_io": ["A", "B"], "fixed": ["X"],
                 "minilm-l6": ["input_ids", "attention_mask"]}
GENERATIVE = "smollm2-135m"
EMBEDDING = "minilm-l6"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
# Model control on a served model would reload or unload what the other cases need: those two operations are
# fuzzed on every other name (404).
MODEL_CONTROL = ("/v2/repository/models/{model}/load", "/v2/repository/models/{model}/unload")
# Rules the document cannot state (they join two query parameters or body fields): the 400s that enforce them are
# expected.
PROSE_LAYOUTS = ("application/octet-stream", "application/msgpack")  # binary bodies JSON Schema cannot describe
CROSS_PARAMETER_RULES = ("is after until", "which is not among the tools", "choices; one request may ask for at most",
                         "has neither 'data' nor parameters.binary_data_size")


@pytest.fixture(scope="module")
def fuzzed(standard_repo: Path, minilm_repo: Path, smollm2_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server on the tiny tensor models, minilm-l6 and smollm2-135m, with an admin key."""
    repo = tmp_path_factory.mktemp("fuzz-repo")
    for source in [*standard_repo.iterdir(), minilm_repo / EMBEDDING, smollm2_repo / GENERATIVE]:
        os.symlink(source, repo / source.name)
    state = tmp_path_factory.mktemp("fuzz-state")
    _, token = KeyStore(state / "keys.json").create(name="fuzz", tenant="fuzz", admin=True, token_input=True)
    running = RunningServer(make_config(repo, state)).start()
    yield running, token
    running.stop()


def _served_names(url: str, token: str) -> set[str]:
    """Every name a served model answers to: its own, its aliases and its tier."""
    listed = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    return {name for model in listed["data"] for name in (model["id"], *model["aliases"], model["tier"]) if name}


def _targets(path: str) -> list[str]:
    """The served models a case of ``path`` is aimed at."""
    if path in MODEL_CONTROL:
        return []
    if path.startswith("/v2/models/"):
        return sorted(TENSOR_INPUTS)
    if path == "/v1/embeddings":
        return [EMBEDDING]
    if path in GENERATION_PATHS:
        return [GENERATIVE]
    if path == "/v1/models/{model}":
        return [*TENSOR_INPUTS, GENERATIVE]
    return []


def _names(case: Any) -> Iterable[Any]:
    yield case.path_parameters.get("model")
    if isinstance(case.body, dict):
        yield case.body.get("model")


def _asks_for_a_timeout(case: Any) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    parameters = body.get("parameters")
    return body.get("timeout") is not None or isinstance(parameters, dict) and parameters.get("timeout") is not None


def _aimed(case: Any) -> Any:
    """Most cases aimed at a served model, picked from the case itself so that a run is reproducible."""
    models = _targets(case.path)
    if not models:
        return case
    pick = zlib.crc32(repr((case.path_parameters, case.body)).encode()) % (len(models) + 1)
    return case if pick == len(models) else _on_model(case, models[pick])


def _on_model(case: Any, model: str) -> Any:
    """``case`` aimed at ``model``: the path, the body's model and its tensors' names, each only where the value
    was valid already (so that a negative case stays negative)."""
    if "model" in case.path_parameters:
        parameters = {**case.path_parameters, "model": model}
        if str(parameters.get("version", "")).isdigit():
            parameters["version"] = "1"
        case.path_parameters = parameters
    if isinstance(case.body, dict):
        body = dict(case.body)
        if isinstance(body.get("model"), str):
            body["model"] = model
        names = TENSOR_INPUTS.get(model)
        if names and isinstance(body.get("inputs"), list):
            body["inputs"] = [{**tensor, "name": names[index % len(names)]}
                              if isinstance(tensor, dict) and isinstance(tensor.get("name"), str) else tensor
                              for index, tensor in enumerate(body["inputs"])]
        case.body = body
    return case


def _short(case: Any) -> Any:
    """Generation cases ask for at most MAX_TOKENS tokens; a value that is not a token count is left alone."""
    if case.path in GENERATION_PATHS and isinstance(case.body, dict):
        body = dict(case.body)
        if body.get("max_tokens") is None:
            body["max_tokens"] = MAX_TOKENS
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[name] = MAX_TOKENS
        case.body = body
    return case


@pytest.fixture(scope="module")
def api(fuzzed: tuple[RunningServer, str]) -> Any:
    """The document the server serves, loaded by schemathesis, with the hooks that aim cases at served models."""
    running, token = fuzzed
    served = _served_names(running.url, token)
    config = SchemathesisConfig.from_dict({
        "seed": 7,
        "generation": {"max-examples": FUZZ_EXAMPLES, "deterministic": True, "mode": "all"},
        "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        "auth": {"openapi": {"bearer": {"bearer": token}}},
        "request-timeout": 30,
    })
    schema = schemathesis.openapi.from_dict(requests.get(f"{running.url}/openapi.json", timeout=10).json(),
                                            config=config)
    schema.config.update(base_url=running.url)

    def names_served(case: Any) -> bool:
        return any(isinstance(name, str) and name in served for name in _names(case))

    @schema.hook
    def map_case(context, case):
        if case.path in MODEL_CONTROL and names_served(case):
            # Names learnt from earlier answers would reload or unload a served model: one it is not, instead.
            case.path_parameters = {**case.path_parameters, "model": f"{case.path_parameters['model']}-not-served"}
        return _short(_aimed(case))

    @schema.hook
    def filter_failure(context, failure, case, response):
        if response.status_code == 400 and not response.content.lstrip().startswith(b"{"):
            # aiohttp's HTTP parser refused the bytes (a malformed header such as 'transfer-encoding;') before any
            # route ran: every error the API itself gives is JSON.
            return False
        if response.status_code == 504 and _asks_for_a_timeout(case):
            return False  # the case's own timeout passed: 504 is the documented answer, not a server fault
        if failure.title != "Schema-valid request rejected" or response.status_code != 400:
            return True
        if case.media_type in PROSE_LAYOUTS:
            # The document gives these bodies as "format: binary" (any bytes) and their layout in prose (a JSON
            # header of Inference-Header-Content-Length bytes, or msgpack): bytes that are no such body get the 400
            # that says so, whichever model they name.
            return False
        if "surrogates not allowed" in response.text:
            # A string holding a lone surrogate escape ("\ud800") is valid JSON but not text: the 400 says so, and
            # JSON Schema has no way to document it.
            return False
        # A request the document allows may still not fit the model it names (a token id beyond its vocabulary,
        # a tensor of another shape, an embedding asked of a generative model): that 400 is the model's check.
        return not (names_served(case) or any(rule in response.text for rule in CROSS_PARAMETER_RULES))

    return schema


def _run(schema: Any) -> tuple[dict[str, int], list[str]]:
    """Cases run per operation, and every failed check or error the engine reported."""
    cases: dict[str, int] = {}
    failures: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.recorder is not None:
            recorder = event.recorder
            cases[recorder.label] = cases.get(recorder.label, 0) + len(recorder.cases)
            for case_id, nodes in recorder.checks.items():
                for node in nodes:
                    if node.failure_info is not None:
                        failure, response = node.failure_info.failure, recorder.find_response(case_id=case_id)
                        answer = f"{response.status_code} {response.text[:300]}" if response is not None else ""
                        failures.append(f"{recorder.label}: {node.name}: {failure.title}: {failure.message}\n"
                                        f"{node.failure_info.code_sample}\n-> {answer}")
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            failures.append(repr(event.exception))
    return cases, failures


def test_every_operation_answers_as_documented(api):
    cases, failures = _run(api)
    documented = {f"{method.upper()} {path}" for path, methods in api.raw_schema["paths"].items()
                  for method in methods}
    assert set(cases) == documented  # every operation was tried
    assert not failures, "\n\n".join(failures)
