"""An INVALID_ARGUMENT with very many bad fields still fits the trailers a client accepts."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.rpc.status import MAX_ERROR_TEXT_BYTES, rpc_status

# grpc's soft limit on the metadata a client accepts (message and details travel there):
# past it some calls are refused at random, so the whole error must stay under it.
CLIENT_METADATA_LIMIT_BYTES = 8 * 1024


def test_thirty_thousand_bad_fields_are_cut_to_a_readable_error_that_counts_the_rest() -> None:
    """The first fields are named as they are, and one last entry says how many more there were."""
    bad = [FieldViolation(f"shadow_rules[{i}]", "unknown rule key") for i in range(30_000)]
    code, status = rpc_status(InvalidArgument(bad))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(request)
    shown = request.field_violations
    assert [v.field for v in shown[:-1]] == [f"shadow_rules[{i}]" for i in range(len(shown) - 1)]
    assert shown[-1].description == f"... and {30_000 - len(shown) + 1} more problems (fix these first)"
    assert len(status.message.encode()) <= MAX_ERROR_TEXT_BYTES + 100
    # The details are sent base64-encoded: 4/3 of their size.
    assert len(status.message) + len(status.SerializeToString()) * 4 // 3 < CLIENT_METADATA_LIMIT_BYTES


def test_a_few_bad_fields_are_all_named() -> None:
    """Below the bound nothing is cut."""
    bad = [FieldViolation("a", "x"), FieldViolation("b", "y")]
    _, status = rpc_status(InvalidArgument(bad))
    assert status.message == "a: x; b: y"
