"""A worker API on loopback for the fan-out tests (plain HTTP or TLS): it behaves as its
server's `behaviour` says and records the token header it got."""

from __future__ import annotations

import http.server
import json
import time

from luksctl.api import cluster


class Worker(http.server.BaseHTTPRequestHandler):
    """Behaves as the server's `behaviour` says; records the token header it got."""

    def do_POST(self):
        server = self.server
        server.tokens.append(self.headers.get(cluster.TOKEN_HEADER))
        if server.behaviour == "slow":
            time.sleep(server.delay)
        if server.behaviour == "trickle":
            data = b'{"nfs_state": "mounted", "padding": "' + b"x" * 100 + b'"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for byte in data:
                    time.sleep(server.delay)
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except OSError:
                pass  # the front end gave up, as it should
            return None
        if server.behaviour == "refuse":
            return self._send(403, {"nfs_state": "unmounted", "error": "wrong token"})
        if server.behaviour == "redirect":
            self.send_response(307)
            self.send_header("Location", server.delay)  # the other server's URL
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if server.behaviour == "html":
            self.send_response(502)
            self.end_headers()
            self.wfile.write(b"<html>bad gateway</html>")
            return None
        return self._send(200, {"nfs_state": "mounted"})

    do_GET = do_POST

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass
