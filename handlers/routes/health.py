from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness (no auth)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
