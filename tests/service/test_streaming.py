"""What happens to a request's other choices when the one awaited fails or the client leaves."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from batching.errors import QueueTimeoutError
from batching.generation.handle import GenerationHandle, fail_now
from service.errors import ApiError
from service.generate.streaming import first_delta, wait_all_or_cancel_on_disconnect


def connected_request() -> Request:
    async def receive() -> dict[str, str]:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def handles(count: int) -> list[GenerationHandle]:
    loop = asyncio.get_running_loop()
    return [GenerationHandle("req", loop, lambda: None) for _ in range(count)]


async def test_a_failed_choice_lets_its_unread_siblings_go():
    first, *siblings = handles(3)
    fail_now(first, QueueTimeoutError(31.0, 30.0))
    with pytest.raises(ApiError) as caught:
        await wait_all_or_cancel_on_disconnect([first, *siblings], connected_request())
    assert caught.value.status == 504
    assert all(sibling.cancel_requested for sibling in siblings)


async def test_a_stream_whose_first_choice_fails_lets_its_siblings_go():
    first, *siblings = handles(2)
    fail_now(first, QueueTimeoutError(31.0, 30.0))
    with pytest.raises(ApiError):
        await first_delta(first, connected_request(), True, siblings)
    assert all(sibling.cancel_requested for sibling in siblings)


async def test_a_shadow_keeps_the_siblings_of_a_failed_choice_running():
    first, *siblings = handles(2)
    fail_now(first, QueueTimeoutError(31.0, 30.0))
    with pytest.raises(ApiError):
        await wait_all_or_cancel_on_disconnect([first, *siblings], connected_request(), False)
    assert not any(sibling.cancel_requested for sibling in siblings)
