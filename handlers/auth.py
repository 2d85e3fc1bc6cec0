"""Authentication and the tenant rule: who is calling, and for whom they may act.

- `AUTH_MODE=jwt` (default): `Authorization: Bearer <HS256 JWT>` verified with `AUTH_JWT_SECRET`.
- `AUTH_MODE=apigateway`: behind an API Gateway HTTP API JWT authorizer, which has already
  verified the token; the claims come from the Lambda event's request context.

`sub` must equal the `{user_id}` in the path; `"role": "service"` may act for any user.

The FastAPI dependencies that apply this to a route (`AuthorizedUser`, `AuthorizedAvatar`) are
in `handlers.dependencies`; `issue_token` (dev tooling, tests) is here. PyJWT is imported on
first use: it pulls in cryptography, a cold-start cost `/healthz` never needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from handlers.problems import Problem
from handlers.settings import Settings

SERVICE_ROLE = "service"
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="avatune"'}


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str | None

    @property
    def is_service(self) -> bool:
        return self.role == SERVICE_ROLE


def may_act_for(principal: Principal, user_id: str) -> bool:
    """The tenant rule: a caller acts for itself; a service for anyone."""
    return principal.is_service or principal.subject == user_id


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers=_UNAUTHORIZED_HEADERS)


def _claims_from_apigateway(request: Request) -> dict[str, Any]:
    event = request.scope.get("aws.event") or {}
    claims = (((event.get("requestContext") or {}).get("authorizer") or {}).get("jwt") or {}).get("claims")
    if not isinstance(claims, dict):
        raise _unauthorized("no verified JWT claims in the API Gateway request context")
    return claims


def _claims_from_bearer(request: Request, secret: str, settings: Settings) -> dict[str, Any]:
    import jwt  # on first use: PyJWT pulls in cryptography, a cold-start cost /healthz never needs

    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <JWT>'")
    # `exp` is required: a token that never expires is a credential that can never be revoked.
    required = [
        "sub",
        "exp",
        *(["aud"] if settings.auth_jwt_audience else []),
        *(["iss"] if settings.auth_jwt_issuer else []),
    ]
    try:
        return jwt.decode(
            token.strip(),
            secret,
            algorithms=["HS256"],
            options={"require": required},
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("token expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _unauthorized(f"token has no {exc.claim!r} claim") from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
        raise _unauthorized("token is not for this API (audience or issuer)") from None
    except jwt.InvalidTokenError:
        # The library's message may echo token parts; keep the answer generic.
        raise _unauthorized("invalid token") from None


def verified_principal(request: Request, settings: Settings) -> Principal:
    """The verified caller of `request`; a 401 Problem when there is none."""
    if settings.auth_mode == "apigateway":
        claims = _claims_from_apigateway(request)
    else:
        secret = settings.jwt_secret()
        if secret is None:  # guarded at start-up too; never accept unsigned tokens
            raise _unauthorized("authentication is not configured")
        claims = _claims_from_bearer(request, secret, settings)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _unauthorized("token has no subject")
    role = claims.get("role")
    return Principal(subject=sub, role=role if isinstance(role, str) else None)


def issue_token(
    secret: str,
    subject: str,
    *,
    role: str | None = None,
    ttl_seconds: int = 86400,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Mint an HS256 token (dev tooling and tests)."""
    import time

    import jwt

    claims: dict[str, Any] = {"sub": subject, "iat": int(time.time()), "exp": int(time.time()) + ttl_seconds}
    if role:
        claims["role"] = role
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
