"""wait_ok against a real local HTTP server."""

import http.server
import threading

import pytest

from turbo_core.http import free_port, wait_ok


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_ok_succeeds_times_out_and_reports_death():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert wait_ok(f"{base}/ok", 5) < 5
        with pytest.raises(TimeoutError, match=r"did not answer 200 within 0\.3 s \(last: HTTP 503"):
            wait_ok(f"{base}/busy", 0.3, interval_s=0.05)
        with pytest.raises(TimeoutError, match=r"last: URLError: .*refused"):
            wait_ok(f"http://127.0.0.1:{free_port()}/", 0.3, interval_s=0.05)
        with pytest.raises(RuntimeError, match="will not come up: process exited"):
            wait_ok(f"{base}/busy", 5, alive=lambda: "process exited")
    finally:
        server.shutdown()
