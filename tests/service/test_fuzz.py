"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis), on both databases.

Whatever the generated input (valid or deliberately broken), the service answers with a status and body its
schema documents, and never with a 5xx. (schemathesis' pytest plugin does not run under pytest 9, so the
operations are driven from a plain test.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from ..support.serverproc import ServerProcess


def test_api_answers_every_generated_request_without_a_server_error(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=server.url, timeout=30)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
            # Schema-valid bodies can still be inconsistent (per-layer arrays longer than the run's layer list):
            # those are precise 422s by design, so "positive data acceptance" is not asked for.
            case.validate_response(response, excluded_checks=[checks.positive_data_acceptance])

        check()
