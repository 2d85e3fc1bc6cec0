"""The API's service layer: what a request does beyond reading its input and shaping its answer.

A route (`handlers/routes/`) validates the request, gets its stores and queues from
`handlers.dependencies`, calls one service function and turns what it returns into a view;
a service works on the typed stores (`handlers/*_store.py`, `handlers.train_queue`) and raises
a `Problem` for each refusal the API documents. Services import no route and no FastAPI
dependency; routes import no other route.

- `jobs`: creating (slot, cap, idempotency, rollback) and cancelling a job of any kind;
- `train_jobs`, `adapter_jobs` (fuse, generate), `context_jobs` (index, retrieve, auto-index):
  each kind's own checks and the queue request it sends;
- `feedback`: judgements of the avatar's replies stored as preference training documents.
"""
