"""boto3 clients for the worker. botocore's standard retry mode retries throttling, 5xx and
connection errors with exponential backoff and jitter, so every S3/SQS call gets it."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import boto3
from botocore.config import Config

from trainer.settings import get_settings

_CONFIG = Config(
    retries={"max_attempts": 8, "mode": "standard"},
    max_pool_connections=64,
    connect_timeout=5,
    # Long polls wait 20 s; the read timeout must outlast them.
    read_timeout=60,
    signature_version="s3v4",
)


@lru_cache
def client(service: str) -> Any:
    settings = get_settings()
    return boto3.client(service, endpoint_url=settings.aws_endpoint_url, region_name=settings.region, config=_CONFIG)


def s3() -> Any:
    return client("s3")


def sqs() -> Any:
    return client("sqs")


@lru_cache
def queue_url(name: str) -> str:
    return sqs().get_queue_url(QueueName=name)["QueueUrl"]
