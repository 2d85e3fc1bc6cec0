"""moto in server mode (S3 and SQS over HTTP, threaded werkzeug, as `python -m moto.server`
runs it) with a bulk loader for the benchmarks.

    python -m bench.moto_server [--port N]

Prints `ready PORT`, then reads one JSON command a line on stdin and answers one JSON line:

    {"op": "populate", "bucket": B, "prefix": P, "start": 0, "stop": 10000}

creates the documents `start..stop-1` of `bench.moto_server.document(i)` straight in moto's
S3 backend (a few seconds for 10,000 objects instead of a minute of PUTs over HTTP). Every
object is a real moto object: listings, tag reads and the API see no difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

FALSE_EVERY = 10  # one document in ten is not used for training
UNTAGGED_EVERY = 33  # and a few carry no tag at all (counted as used)


def document(i: int) -> tuple[str, bytes, str | None]:
    """Name, content and flag tag value ('true' / 'false' / None: untagged) of document i.

    Names are spread over the key space (a hash first), so documents added later land
    between earlier ones, as real uploads do."""
    h = hashlib.sha1(str(i).encode()).hexdigest()[:8]
    name = f"{h}-chat-{i:05d}.jsonl"
    body = (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
        ).encode()
        + b"\n"
    )
    if i % UNTAGGED_EVERY == 7:
        return name, body, None
    return name, body, "false" if i % FALSE_EVERY == 3 else "true"


def _populate(cmd: dict) -> dict:
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for i in range(cmd["start"], cmd["stop"]):
        name, body, flag = document(i)
        key = backend.put_object(cmd["bucket"], cmd["prefix"] + name, body)
        if flag is not None:
            backend.put_object_tagging(key, {"use_for_training": flag})
    return {"ok": True, "created": cmd["stop"] - cmd["start"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    print(f"ready {server.get_host_and_port()[1]}", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            answer = _populate(cmd) if cmd.get("op") == "populate" else {"ok": False, "error": "unknown op"}
        except Exception as exc:  # answer, never die: the bench reports it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
