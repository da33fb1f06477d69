"""The system port's liveness: 503 once the main loop stops publishing, 200 again after."""

from __future__ import annotations

import time

import httpx

from segue.frontend.system import SystemServer


def wait_status(url: str, status: int, deadline_s: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + deadline_s
    while True:
        r = httpx.get(url)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def test_live_and_health_report_a_stalled_publisher():
    server = SystemServer("127.0.0.1", 0, lambda: b"# metrics\n", stall_s=0.3)
    port = server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        server.publish(b'{"status": "ok"}', True)
        assert httpx.get(base + "/live").status_code == 200
        h = httpx.get(base + "/health")
        assert h.status_code == 200 and h.json() == {"status": "ok"}
        assert httpx.get(base + "/metrics").text == "# metrics\n"
        # nothing published since: the main loop counts as stalled
        r = wait_status(base + "/live", 503)
        assert r.status_code == 503 and r.json()["status"] == "stalled"
        assert r.json()["event_loop_stalled_s"] >= 0.3
        assert httpx.get(base + "/health").status_code == 503
        server.publish(b'{"status": "unavailable"}', False)
        assert httpx.get(base + "/live").status_code == 200
        assert httpx.get(base + "/health").status_code == 503  # published as unhealthy
    finally:
        server.stop()
    assert not server._thread.is_alive()
