"""Print a development JWT: `python -m handlers.devtoken USER_ID [--service] [--ttl SECONDS]`."""

from __future__ import annotations

import argparse

from handlers.auth import SERVICE_ROLE, issue_token
from handlers.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--service", action="store_true", help="mint a service token (may act for any user)")
    parser.add_argument("--ttl", type=int, default=86400, help="lifetime in seconds")
    args = parser.parse_args(argv)
    secret = get_settings().jwt_secret()
    if secret is None:
        parser.exit(2, "no AUTH_JWT_SECRET set and DEV_MODE is off: cannot mint a token\n")
    print(issue_token(secret, args.user_id, role=SERVICE_ROLE if args.service else None, ttl_seconds=args.ttl))


if __name__ == "__main__":
    main()
