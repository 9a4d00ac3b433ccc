"""When the worker's event loop holds a whole request and may hand it to a thread."""

import pytest

from luksctl.api.gunicorn_worker import request_complete

HEAD = b"POST /luksctl_api/v1.0/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(("data", "complete"), [
    (b"", False),
    (b"GET /luksctl_api/v1.0/status HTTP/1.1\r\nHost: x\r\n", False),
    (b"GET /luksctl_api/v1.0/status HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (HEAD + b"Content-Length: 4\r\n\r\n{}", False),
    (HEAD + b"Content-Length: 2\r\n\r\n{}", True),
    (HEAD + b"content-length:  2 \r\n\r\n{}", True),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", False),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n", False),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", True),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;ext=1\r\n{}\r\n0\r\nX-Trailer: y\r\n\r\n", True),
    # A chunk whose data looks like the last chunk is data, not the end.
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n7\r\n0\r\n\r\n{}\r\n", False),
    # Malformed framing: handed on, so gunicorn's parser answers 400 from what is buffered.
    (HEAD + b"Content-Length: two\r\n\r\n", True),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", True),
])
def test_request_complete(data, complete):
    assert request_complete(data) is complete
