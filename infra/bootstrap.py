"""Create the bucket and queues avatune needs on an S3/SQS endpoint (moto, LocalStack or AWS).

Idempotent: safe to run on every start. Used by `make dev`, the tests and the LocalStack
init hook. Names come from the same environment variables the services read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import boto3

# Redrive after this many receives: a poison message stops blocking its FIFO group.
MAX_RECEIVE_COUNT = 5


@dataclass(frozen=True)
class StackNames:
    bucket: str
    train_queue: str
    events_queue: str

    @property
    def train_dlq(self) -> str:
        return self.train_queue.removesuffix(".fifo") + "-dlq.fifo"

    @property
    def events_dlq(self) -> str:
        return self.events_queue + "-dlq"

    @classmethod
    def from_env(cls) -> StackNames:
        return cls(
            bucket=os.environ.get("S3_BUCKET", "avatune-dev"),
            train_queue=os.environ.get("TRAIN_QUEUE_NAME", "avatune-train.fifo"),
            events_queue=os.environ.get("EVENTS_QUEUE_NAME", "avatune-events"),
        )


def _create_queue_with_dlq(sqs, name: str, dlq_name: str, fifo: bool, visibility: int) -> str:
    dlq_attrs = {"MessageRetentionPeriod": "1209600"}
    if fifo:
        dlq_attrs["FifoQueue"] = "true"
    dlq_url = sqs.create_queue(QueueName=dlq_name, Attributes=dlq_attrs)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    attrs = {
        "VisibilityTimeout": str(visibility),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}),
    }
    if fifo:
        attrs["FifoQueue"] = "true"
    try:
        return sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
    except sqs.exceptions.QueueNameExists:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attrs)
        return url


def bootstrap(names: StackNames | None = None, endpoint_url: str | None = None) -> dict[str, str]:
    """Create bucket, train FIFO queue + DLQ and events queue + DLQ; return their names/urls."""
    names = names or StackNames.from_env()
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    sqs = boto3.client("sqs", endpoint_url=endpoint_url, region_name=region)
    try:
        if region == "us-east-1":
            s3.create_bucket(Bucket=names.bucket)
        else:
            s3.create_bucket(Bucket=names.bucket, CreateBucketConfiguration={"LocationConstraint": region})
    except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        pass
    # Versioned, like the deployed bucket (infra/aws/template.yaml): "delete all unused" relies
    # on it to undo a delete that raced a flag change (handlers.training_data_store).
    s3.put_bucket_versioning(Bucket=names.bucket, VersioningConfiguration={"Status": "Enabled"})
    train_url = _create_queue_with_dlq(sqs, names.train_queue, names.train_dlq, fifo=True, visibility=120)
    events_url = _create_queue_with_dlq(sqs, names.events_queue, names.events_dlq, fifo=False, visibility=30)
    return {"bucket": names.bucket, "train_queue_url": train_url, "events_queue_url": events_url}


if __name__ == "__main__":
    print(json.dumps(bootstrap(), indent=2))
