"""Property-based fuzzing of the public API from its own OpenAPI document (schemathesis).

The session's public tier serves ``/openapi.json``; every documented operation gets a fixed
budget of generated requests (derandomized: the same cases on every run), valid and invalid
ones, with the test API key. Every answer must be free of server errors, carry a documented
status code and content type, and match the documented schema for that status. Operations on a
model are fuzzed with random names and with the deployed models' names, and inference also with
near-valid bodies for two models, so that validation and the served path are both reached.
Each test checks that its own strategies sent their budget, so any test can run alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Tiers

pytestmark = pytest.mark.slow

EXAMPLES = 20  # per operation, generation mode and model name
# Hypothesis may stop a strategy early (too many rejected draws); most of its budget must run.
# An operation without parameters or body has a single case to send.
MIN_CASES = EXAMPLES * 3 // 4
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{model}"),
    ("GET", "/v2/models/{model}/ready"),
    ("GET", "/v2/models"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/models/{model}/infer"),
    ("GET", "/v1/terms"),
    ("POST", "/v1/terms/accept"),
    ("POST", "/v1/embeddings"),
]
MODELS = ("digits", "nested")  # deployed in the session tiers (MiniLM is left out: CPU)
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # a fixed seed: the same cases on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    print_blob=False,
)


@pytest.fixture(scope="module")
def schema(tiers: Tiers) -> schemathesis.BaseSchema:
    with tiers.http(authenticated=False) as http:
        document: dict[str, Any] = http.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer sv_...`",
    }
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert documented == set(OPERATIONS)  # a new route must join the fuzz
    return schemathesis.openapi.from_dict(document)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:  # keep-alive across the cases
        yield http


def _call(case: Case[Any], tiers: Tiers, session: requests.Session) -> Any:
    """Send ``case`` with the test key over TLS verified against the deployment's CA."""
    return case.call(
        base_url=tiers.url,
        session=session,
        headers={"Authorization": f"Bearer {tiers.deployment.api_key}"},
        verify=str(tiers.deployment.ca_cert),
        timeout=60,
    )


def _fuzz(strategy: st.SearchStrategy[Case[Any]], tiers: Tiers, session: requests.Session) -> int:
    """Send each case ``strategy`` generates and check its answer; how many were sent."""
    sent = 0

    @FUZZ
    @given(case=strategy)
    def fuzz(case: Case[Any]) -> None:
        nonlocal sent
        sent += 1
        case.validate_response(_call(case, tiers, session), checks=CHECKS)

    fuzz()
    return sent


def _has_input(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or bool(list(operation.body))


def _variants(operation: Any) -> list[tuple[GenerationMode, dict[str, str] | None]]:
    """Valid and invalid requests; for a model's operations also with the deployed names."""
    has_input = _has_input(operation)
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else [])
    variants: list[tuple[GenerationMode, dict[str, str] | None]] = [(m, None) for m in modes]
    if "{model}" in operation.path:
        variants += [(m, {"model": name}) for name in MODELS for m in modes]
    return variants


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_documented_answers(
    schema: schemathesis.BaseSchema,
    tiers: Tiers,
    session: requests.Session,
    method: str,
    path: str,
) -> None:
    operation = schema[path][method]
    sent: dict[str, int] = {}
    for mode, names in _variants(operation):
        label = f"{mode.value} {names or ''}".strip()
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=names)
        sent[label] = _fuzz(strategy, tiers, session)
    least = MIN_CASES if _has_input(operation) else 1
    assert all(count >= least for count in sent.values()), sent  # the budget ran


def _tensor(name: str, shape: list[int], datatype: Any) -> st.SearchStrategy[dict[str, Any]]:
    count = 1
    for size in shape:
        count *= size
    values = st.floats(-1e5, 1e5, allow_nan=False, width=32)
    return st.fixed_dictionaries(
        {
            "name": st.just(name),
            "shape": st.just(shape),
            "datatype": datatype,
            "data": st.lists(values, min_size=count, max_size=count),
        }
    )


def _near_valid(model: str) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies with the model's input name and shape, varying batch, datatype, values, k."""
    datatype = st.sampled_from(["FP32", "FP16", "FP64", "INT32"])
    if model == "digits":
        inputs = st.integers(1, 3).flatmap(lambda b: _tensor("image", [b, 1, 8, 8], datatype))
    else:
        shapes = st.tuples(st.integers(1, 3), st.integers(1, 6))
        inputs = shapes.flatmap(lambda s: _tensor("tokens", [s[0], s[1], 12], datatype))
    return st.fixed_dictionaries(
        {"inputs": inputs.map(lambda tensor: [tensor])},
        optional={
            "id": st.text(max_size=64),
            "parameters": st.fixed_dictionaries({"classification": st.integers(-1, 12)}),
        },
    )


@pytest.mark.parametrize("model", MODELS)
def test_near_valid_inference_bodies_get_documented_answers(
    schema: schemathesis.BaseSchema, tiers: Tiers, session: requests.Session, model: str
) -> None:
    operation = schema["/v2/models/{model}/infer"]["POST"]
    statuses: Counter[int] = Counter()
    sent = 0

    @FUZZ
    @given(body=_near_valid(model))
    def fuzz(body: dict[str, Any]) -> None:
        nonlocal sent
        case = schema.make_case(
            operation=operation,
            path_parameters={"model": model},
            body=body,
            media_type="application/json",
        )
        sent += 1
        response = _call(case, tiers, session)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert sent >= MIN_CASES  # the budget ran
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # both paths were reached
