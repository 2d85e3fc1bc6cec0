"""The API as `make dev` serves it: uvicorn with hot reload on 127.0.0.1:PORT, logging through
`contracts.logs` (LOG_FORMAT) in the reloader and the server alike, so the terminal shows one
format. `python -m infra.dev_api PORT`.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from contracts import logs


def main(port: int) -> None:
    logs.configure("api")
    # The reloader's "N changes detected" lines (byte code being written, an editor's temp files):
    # a reload itself is still logged by uvicorn.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    uvicorn.run(
        "handlers.app:app",
        host="127.0.0.1",
        port=port,
        reload=True,
        reload_dirs=["handlers", "contracts"],
        log_config=None,  # keep contracts.logs' handler (the server process configures it again on import)
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
