"""Authentication and tenant authorisation as FastAPI dependencies.

- `AUTH_MODE=jwt` (default): `Authorization: Bearer <HS256 JWT>` verified with `AUTH_JWT_SECRET`.
- `AUTH_MODE=apigateway`: behind an API Gateway HTTP API JWT authorizer, which has already
  verified the token; the claims come from the Lambda event's request context.

`sub` must equal the `{user_id}` in the path; `"role": "service"` may act for any user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from contracts import logs
from contracts.ids import InvalidIdentifier, validate_id
from handlers.avatar_ref import AvatarRef
from handlers.problems import Problem
from handlers.settings import Settings, get_settings

SERVICE_ROLE = "service"
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="avatune"'}


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str | None

    @property
    def is_service(self) -> bool:
        return self.role == SERVICE_ROLE


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers=_UNAUTHORIZED_HEADERS)


def _claims_from_apigateway(request: Request) -> dict[str, Any]:
    event = request.scope.get("aws.event") or {}
    claims = (((event.get("requestContext") or {}).get("authorizer") or {}).get("jwt") or {}).get("claims")
    if not isinstance(claims, dict):
        raise _unauthorized("no verified JWT claims in the API Gateway request context")
    return claims


def _claims_from_bearer(request: Request, secret: str) -> dict[str, Any]:
    import jwt  # on first use: PyJWT pulls in cryptography, a cold-start cost /healthz never needs

    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <JWT>'")
    try:
        return jwt.decode(token.strip(), secret, algorithms=["HS256"], options={"require": ["sub"]})
    except jwt.ExpiredSignatureError:
        raise _unauthorized("token expired") from None
    except jwt.InvalidTokenError:
        # The library's message may echo token parts; keep the answer generic.
        raise _unauthorized("invalid token") from None


def current_principal(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> Principal:
    """The verified caller."""
    if settings.auth_mode == "apigateway":
        claims = _claims_from_apigateway(request)
    else:
        secret = settings.jwt_secret()
        if secret is None:  # guarded at start-up too; never accept unsigned tokens
            raise _unauthorized("authentication is not configured")
        claims = _claims_from_bearer(request, secret)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _unauthorized("token has no subject")
    role = claims.get("role")
    return Principal(subject=sub, role=role if isinstance(role, str) else None)


def _checked_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except InvalidIdentifier as exc:
        raise Problem(400, str(exc)) from None


async def authorized_user(
    user_id: Annotated[str, Path(description="the user's id")],
    principal: Annotated[Principal, Depends(current_principal)],
) -> str:
    """The path's `user_id`, once the caller is allowed to act for it."""
    if not (principal.is_service or principal.subject == user_id):
        raise Problem(403, "this token may not act for another user's data")
    user_id = _checked_id(user_id, "user_id")
    logs.bind(user_id=user_id)  # async dependency: the binding lives in the request's task
    return user_id


async def authorized_avatar(
    user_id: Annotated[str, Depends(authorized_user)],
    avatar_id: Annotated[str, Path(description="the avatar's id")],
) -> AvatarRef:
    """The path's user and avatar, validated and authorised."""
    avatar = AvatarRef(user_id=user_id, avatar_id=_checked_id(avatar_id, "avatar_id"))
    logs.bind(avatar_id=avatar.avatar_id)
    return avatar


AuthorizedAvatar = Annotated[AvatarRef, Depends(authorized_avatar)]
AuthorizedUser = Annotated[str, Depends(authorized_user)]


def issue_token(secret: str, subject: str, *, role: str | None = None, ttl_seconds: int = 86400) -> str:
    """Mint an HS256 token (dev tooling and tests)."""
    import time

    import jwt

    claims: dict[str, Any] = {"sub": subject, "iat": int(time.time()), "exp": int(time.time()) + ttl_seconds}
    if role:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm="HS256")
