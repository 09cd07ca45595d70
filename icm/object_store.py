"""A real S3-compatible server on loopback, for a machine without a bucket.

Ray Serve LLM loads LoRA adapters only from object storage (``dynamic_lora_loading_path`` must
be ``s3://``, ``gs://``, ``abfss://`` or ``azure://``). On a cluster that is the storage root's
bucket; on one box, `LocalS3` runs moto's S3 server (the same HTTP API boto3 and pyarrow speak)
on 127.0.0.1 and points this process's environment at it, so that everything started
afterwards (Ray, its workers, vLLM's replicas) inherits the endpoint and the test credentials:

    with LocalS3(bucket="icm-adapters") as s3:   # s3.uri == "s3://icm-adapters"
        ...                                       # push_dir(folder, s3.uri + "/<id>")

The objects live in the server's memory: they go when it stops (the adapters' durable copy is
the local adapter store; `icm serve` publishes it again at start).
"""

from __future__ import annotations

import os

from icm.io import free_port

# What boto3 (Ray's LoRA loader) and pyarrow (icm.storage) read to find and sign for the server.
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


class LocalS3:
    """moto's S3 server on ``host``:``port`` (0: a free port) with ``bucket`` created; the
    environment variables of `_ENV_KEYS` are set while it runs and restored after."""

    def __init__(self, bucket: str = "icm-adapters", *, host: str = "127.0.0.1", port: int = 0):
        self.bucket, self.host, self.port = bucket, host, port or free_port(host)
        self.server = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The variables a process needs to reach this server (test credentials: moto accepts any)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_ACCESS_KEY_ID": "icm-local", "AWS_SECRET_ACCESS_KEY": "icm-local",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()
        self._saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
        os.environ.update(self.env())
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
