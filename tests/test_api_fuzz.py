"""Property-based run of the whole OpenAPI document (schemathesis) against the in-process app.

Every operation the document lists gets generated requests, valid and invalid.
Each one is sent three times: with an admin token (no 5xx, errors are
`{"detail": str}`), without a token and with a made-up one (never a 2xx,
except the health check).
"""

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from tests.factories import add_demo, add_fake_version, add_token

# Bounded so the whole run stays well under a minute on a busy machine.
EXAMPLES_PER_OPERATION = 30
PUBLIC = {("GET", "/health/")}


def _without_auth(headers: dict | None) -> dict:
    return {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}


def test_generated_requests_never_fail_with_5xx_nor_get_in_without_a_token(data_dir, session):
    # Something to find: 50 validated images (training can be queued) and a production model.
    add_demo(session, per_category=10, size=16)
    add_fake_version(session)
    admin = add_token(session, "admin", label="fuzz admin")
    from api.app import app

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12

    for operation in operations:
        fuzz(operation, admin)


def fuzz(operation, admin: dict) -> None:
    """Run the generated requests of one operation."""
    public = (operation.method.upper(), operation.path) in PUBLIC
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case):
        case.headers = _without_auth(case.headers)
        where = f"{case.method} {case.formatted_path}"
        response = case.call(headers=admin)
        assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
        if response.status_code >= 400 and response.status_code != 405:
            assert isinstance(response.json()["detail"], str), f"{where}: {response.text}"
        for headers in ({}, {"Authorization": "Bearer tdb_guessed"}):
            response = case.call(headers=headers)
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
            if not public:
                assert not 200 <= response.status_code < 300, f"{where} let a caller in without a valid token"

    check()
