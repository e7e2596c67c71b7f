from __future__ import annotations

import base64
import json

import pytest

from modelforge.jobs.v1.jobs_pb2 import ListDatasetsRequest, ListJobsRequest
from modelforge_server import paging
from modelforge_server.errors import InvalidArgument

REQUEST = ListJobsRequest(model="m", labels={"team": "vision"}, page_size=10)


def test_page_size_defaults_caps_and_refuses_negatives() -> None:
    assert paging.page_size(0, default=20, maximum=100) == 20
    assert paging.page_size(7, default=20, maximum=100) == 7
    assert paging.page_size(1000, default=20, maximum=100) == 100
    with pytest.raises(InvalidArgument, match="page_size"):
        paging.page_size(-1)


def test_token_round_trips_the_key() -> None:
    key = ["model-a", 42]
    token = paging.encode(key, REQUEST)
    assert "model-a" not in token
    assert paging.decode(token, (str, int), REQUEST) == key
    assert paging.decode("", (str, int), REQUEST) is None
    # the next page may be of another size, and comes with the token itself
    assert paging.decode(token, (str, int), ListJobsRequest(model="m", labels={"team": "vision"}, page_token=token))


@pytest.mark.parametrize("token", ["not a token!", "e30", "bm90LWpzb24"])
def test_foreign_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token is not one this server issued"):
        paging.decode(token, (str, int), REQUEST)


@pytest.mark.parametrize(
    "key",
    [
        ["model-a"],
        ["model-a", 42, "x"],
        [42, "model-a"],
        ["model-a", True],
        [None, None],
        ["model-a", 2**63],  # beyond a bigint: PostgreSQL would refuse it, as an internal error
        ["model-a", -(2**70)],
        ["model\x00a", 42],  # text holds no NUL
    ],
)
def test_tokens_of_another_listing_are_invalid_argument(key: list[object]) -> None:
    with pytest.raises(InvalidArgument, match="page_token does not belong to this listing"):
        paging.decode(paging.encode(key, REQUEST), (str, int), REQUEST)


def test_a_token_of_another_listing_whose_key_fits_is_invalid_argument() -> None:
    # Both list by (create time, id), and unfiltered requests of either serialise to nothing.
    token = paging.encode(["2026-11-25T00:00:00+00:00", "0b5e"], ListDatasetsRequest())
    with pytest.raises(InvalidArgument, match="page_token does not belong to this listing"):
        paging.decode(token, (str, str), ListJobsRequest())
    assert paging.decode(token, (str, str), ListDatasetsRequest()) == ["2026-11-25T00:00:00+00:00", "0b5e"]


@pytest.mark.parametrize(
    "other", [ListJobsRequest(model="other", labels={"team": "vision"}), ListJobsRequest(model="m"), ListJobsRequest()]
)
def test_a_token_given_with_other_filters_is_invalid_argument(other: ListJobsRequest) -> None:
    token = paging.encode(["2026-01-01T00:00:00+00:00", "x"], REQUEST)
    with pytest.raises(InvalidArgument, match="page_token came with other filters than the request that gave it"):
        paging.decode(token, (str, str), other)


@pytest.mark.parametrize(
    "payload",
    [["model-a", 42], {"k": ["model-a", 42], "r": ""}],  # as versions before the listing's name was kept issued
)
def test_a_token_from_an_earlier_version_is_refused_with_how_to_start_again(payload: object) -> None:
    token = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    with pytest.raises(InvalidArgument, match="from another version of ModelForge does not carry over: list again"):
        paging.decode(token, (str, int), REQUEST)
