"""The web side keeps at most MAX_BODY of a request body (proxy/web/app.py BoundedRequest):
twisted.web alone would keep any body, spilling to a temporary file past 100 KB."""

from __future__ import annotations

from io import BytesIO

from twisted.web.test.requesthelper import DummyChannel

from proxy.web.app import MAX_BODY, BoundedRequest


def fed(length: int | None, chunks: list[bytes]) -> BoundedRequest:
    request = BoundedRequest(DummyChannel())
    request.gotLength(length)
    for chunk in chunks:
        request.handleContentChunk(chunk)
    return request


def test_a_body_within_the_bound_is_kept_whole_in_memory():
    body = b"x" * MAX_BODY
    request = fed(len(body), [body[:1000], body[1000:]])
    assert not request.too_large
    assert isinstance(request.content, BytesIO) and request.content.getvalue() == body


def test_a_body_said_to_be_larger_is_not_kept_at_all():
    request = fed(MAX_BODY + 1, [b"x" * 4096] * 20)
    assert request.too_large and request.content.getvalue() == b""


def test_a_chunked_body_that_grows_past_the_bound_is_dropped():
    request = fed(None, [b"x" * 4096] * 16 + [b"y"] + [b"z" * 4096] * 100)
    assert request.too_large and request.content.getvalue() == b""
    assert isinstance(request.content, BytesIO)  # never a temporary file on disk
