"""deploy/healthcheck.py: the Ray containers' health checks (run here against real local endpoints)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))

import healthcheck  # noqa: E402


class _Version(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/api/version" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_head_check_against_a_real_http_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthcheck.head_ok(base + "/api/version") is None
        assert "404" in healthcheck.head_ok(base + "/missing")
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.head_ok(base + "/api/version") is not None        # nothing listens any more


def test_node_check_reads_process_names(tmp_path):
    for pid, name in ((1, "tini"), (42, "raylet"), (77, "gcs_server")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(name + "\n")
    assert sorted(healthcheck.running_commands(tmp_path)) == ["gcs_server", "raylet", "tini"]
    assert Path("/proc/self/comm").read_text().strip() in healthcheck.running_commands()       # the real /proc


def test_cli_exit_codes():
    script = str(ROOT / "deploy" / "healthcheck.py")
    assert subprocess.run([sys.executable, script], capture_output=True).returncode == 2
    bad = subprocess.run([sys.executable, script, "head", "http://127.0.0.1:9/api/version"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("unhealthy:")
