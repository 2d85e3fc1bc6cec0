"""Print a development JWT: `python -m handlers.devtoken USER_ID [--service] [--ttl SECONDS]`."""

from __future__ import annotations

import argparse
import sys

from handlers.auth import SERVICE_ROLE, issue_token
from handlers.settings import DEV_JWT_SECRET, get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--service", action="store_true", help="mint a service token (may act for any user)")
    parser.add_argument("--ttl", type=int, default=86400, help="lifetime in seconds")
    args = parser.parse_args(argv)
    secret = get_settings().jwt_secret()
    if secret is None:
        # Without a secret in this shell, mint for a `make dev` server (DEV_MODE, public dev secret).
        print(
            "avatune: AUTH_JWT_SECRET is not set here: this token is signed with the public dev secret "
            "and only works against a server in DEV_MODE",
            file=sys.stderr,
        )
        secret = DEV_JWT_SECRET
    print(issue_token(secret, args.user_id, role=SERVICE_ROLE if args.service else None, ttl_seconds=args.ttl))


if __name__ == "__main__":
    main()
