#!/bin/bash
# LocalStack READY hook: create the avatune bucket and queues (idempotent).
#
# Mounted by docker-compose.yml at /etc/localstack/init/ready.d; ./infra is mounted at
# /opt/avatune/infra so this reuses infra/bootstrap.py (the same code `make dev` and the tests
# use). If no Python with boto3 is found, falls back to awslocal commands that create the
# same resources. LocalStack marks the hook ERROR on a non-zero exit, which the compose
# healthcheck turns into an unhealthy container.
set -euo pipefail

# Inside the LocalStack container the gateway is always on localhost:4566.
export AWS_ENDPOINT_URL="${BOOTSTRAP_ENDPOINT_URL:-http://localhost:4566}"
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
# Same names and defaults as infra/bootstrap.py (StackNames.from_env) and docker-compose.yml.
export S3_BUCKET="${S3_BUCKET:-avatune-dev}"
export TRAIN_QUEUE_NAME="${TRAIN_QUEUE_NAME:-avatune-train.fifo}"
export EVENTS_QUEUE_NAME="${EVENTS_QUEUE_NAME:-avatune-events}"

SRC_ROOT="${AVATUNE_SRC:-/opt/avatune}"
MAX_RECEIVE_COUNT=5

log() { echo "[avatune-bootstrap] $*" >&2; }

# First Python that can import boto3: an explicit override, LocalStack's own venv, then python3.
pick_python() {
    local py
    for py in ${BOOTSTRAP_PYTHON:-} /opt/code/localstack/.venv/bin/python python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import boto3' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if [[ -f "$SRC_ROOT/infra/bootstrap.py" ]] && PY="$(pick_python)"; then
    log "running infra.bootstrap from $SRC_ROOT with $PY against $AWS_ENDPOINT_URL"
    cd "$SRC_ROOT"
    # The source is mounted read-only: do not try to write __pycache__.
    PYTHONDONTWRITEBYTECODE=1 "$PY" -m infra.bootstrap
    exit 0
fi

# ---- Fallback: awslocal (or plain aws) ------------------------------------------------------
if command -v awslocal >/dev/null 2>&1; then
    AWS=(awslocal)
elif command -v aws >/dev/null 2>&1; then
    AWS=(aws --endpoint-url "$AWS_ENDPOINT_URL")
else
    log "no python with boto3, awslocal or aws found; cannot bootstrap"
    exit 1
fi
log "infra/bootstrap.py not usable here; creating resources with ${AWS[0]}"

ensure_bucket() {
    local bucket="$1"
    if "${AWS[@]}" s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$AWS_DEFAULT_REGION" == "us-east-1" ]]; then
        "${AWS[@]}" s3api create-bucket --bucket "$bucket" >/dev/null
    else
        "${AWS[@]}" s3api create-bucket --bucket "$bucket" \
            --create-bucket-configuration "LocationConstraint=$AWS_DEFAULT_REGION" >/dev/null
    fi
}

# ensure_queue NAME FIFO(true|false) -> prints the queue URL
ensure_queue() {
    local name="$1" fifo="$2" url
    if url="$("${AWS[@]}" sqs get-queue-url --queue-name "$name" --query QueueUrl --output text 2>/dev/null)"; then
        echo "$url"
    elif [[ "$fifo" == "true" ]]; then
        "${AWS[@]}" sqs create-queue --queue-name "$name" --attributes FifoQueue=true \
            --query QueueUrl --output text
    else
        "${AWS[@]}" sqs create-queue --queue-name "$name" --query QueueUrl --output text
    fi
}

# ensure_queue_with_dlq NAME DLQ_NAME FIFO(true|false) VISIBILITY_TIMEOUT
ensure_queue_with_dlq() {
    local name="$1" dlq_name="$2" fifo="$3" visibility="$4" dlq_url dlq_arn url
    dlq_url="$(ensure_queue "$dlq_name" "$fifo")"
    "${AWS[@]}" sqs set-queue-attributes --queue-url "$dlq_url" \
        --attributes MessageRetentionPeriod=1209600
    dlq_arn="$("${AWS[@]}" sqs get-queue-attributes --queue-url "$dlq_url" \
        --attribute-names QueueArn --query Attributes.QueueArn --output text)"
    url="$(ensure_queue "$name" "$fifo")"
    "${AWS[@]}" sqs set-queue-attributes --queue-url "$url" --attributes "$(printf \
        '{"VisibilityTimeout":"%s","RedrivePolicy":"{\\"deadLetterTargetArn\\":\\"%s\\",\\"maxReceiveCount\\":\\"%s\\"}"}' \
        "$visibility" "$dlq_arn" "$MAX_RECEIVE_COUNT")"
    log "queue $name -> $url (dlq $dlq_name)"
}

ensure_bucket "$S3_BUCKET"
# DLQ naming mirrors StackNames.train_dlq / events_dlq in infra/bootstrap.py.
ensure_queue_with_dlq "$TRAIN_QUEUE_NAME" "${TRAIN_QUEUE_NAME%.fifo}-dlq.fifo" true 120
ensure_queue_with_dlq "$EVENTS_QUEUE_NAME" "${EVENTS_QUEUE_NAME}-dlq" false 30
log "bucket $S3_BUCKET and queues ready"
