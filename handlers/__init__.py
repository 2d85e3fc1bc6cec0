"""The avatune HTTP API (FastAPI, served by uvicorn locally and Mangum on AWS Lambda).

Must stay light: nothing under `handlers` may import torch, transformers or peft.

Where things live (each layer imports only the layers below it; tests/api/test_api_layout.py):

- `app.py`, `lambda_handler.py`: the application and its Lambda entry point;
- `routes/`: one module per resource: validate the request, call a service or a store, answer
  a view. No route imports another;
- `dependencies.py`: every FastAPI dependency (settings, the caller's authorisation, stores
  and queues, the Idempotency-Key header), so nothing below knows about `Depends`;
- `services/`: what a request does beyond reading it and answering: creating (slot, cap,
  idempotency, rollback) and cancelling jobs, each job kind's own checks, and promoting a
  version (checked against the serving targets, announced with `adapter.promoted`);
- `job_views.py`: how the API shows a job;
- the stores, one per kind of S3 key, plain classes without FastAPI: `job_store.py`,
  `adapter_store.py`, `training_data_store.py` (with its cache, `flag_index.py`),
  `context_store.py`, `file_store.py` and `fine_tuning_store.py` (the user's files and
  fine-tuning entries), `feedback_keys.py` (feedback's Idempotency-Key records);
  `train_queue.py` for SQS;
- S3 underneath them: `s3_json.py` (small JSON objects, conditional writes), `s3_objects.py`
  (S3 failures as typed answers), `aws.py` (the process's clients);
- request helpers: `auth.py`, `idempotency.py`, `job_spec.py`, `uploads.py`, `paging.py`,
  `archive.py`, `problems.py` (every error is problem+json); plain data: `avatar_ref.py`,
  `documents.py`, `settings.py`;
- the OpenAI-compatible API (`openai_app.py`, mounted at `/openai/v1` and built on its first
  request by `lazy_app.py`, so it costs the cold start nothing): its routes
  `routes/openai_files.py` and `routes/openai_fine_tuning.py`, its services
  `services/openai_*.py` (a fine-tuning job is a train job made by `services/train_jobs.py`),
  OpenAI's shapes `openai_models.py`, how it shows a job `openai_views.py`, and OpenAI's error
  body `openai_errors.py`;
- the events Lambda, bundled on its own (standard library and `contracts` only):
  `events_handler.py`, `webhooks.py`.
"""
