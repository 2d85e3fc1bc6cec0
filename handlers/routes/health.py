from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness (no auth)")
async def healthz() -> dict[str, str]:
    """`{"status": "ok"}` while the process serves; needs no token and touches neither S3 nor SQS."""
    return {"status": "ok"}
