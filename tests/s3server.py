"""An S3-compatible object store on loopback for tests: moto's server mode (`moto_server`), started
as a real process on 127.0.0.1 and a free port, and spoken to over HTTP by boto3, pyarrow's
S3FileSystem and MLflow exactly as they speak to a team's store. No MinIO, Garage or SeaweedFS
package is reachable from this machine's package index; moto's server is the S3 server that is.

    with s3_server(tmp_path) as s3:
        s3.create_bucket("artifacts")
        env = {**os.environ, **s3.env}    # for a subprocess: MLflow, Ray workers, the CLI
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serving import free_port

BIN = Path(sys.executable).parent


@dataclass
class S3Server:
    endpoint: str
    pid: int
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What clients need: fixed test credentials (moto accepts any), the endpoint for MLflow
        (`MLFLOW_S3_ENDPOINT_URL`) and for boto3/pyarrow (`AWS_ENDPOINT_URL_S3`)."""
        return {
            "AWS_ACCESS_KEY_ID": "squadtune-test",
            "AWS_SECRET_ACCESS_KEY": "squadtune-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def client(self):
        import boto3

        env = self.env
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(folder: Path, timeout: float = 60) -> Iterator[S3Server]:
    """Run `moto_server` on 127.0.0.1 until the block ends; its state is in memory only."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / f"moto-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                time.sleep(0.2)
        yield S3Server(endpoint=endpoint, pid=proc.pid, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
