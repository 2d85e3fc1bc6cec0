"""The API as benchmark 1 serves it: `handlers.app:app` with the training-data store chosen per
request by the `x-bench-store` header (`indexed`, the default and what production runs;
`concurrent`: tag reads only, 64 at a time, no index; `baseline`: the straightforward code).
`x-bench-fresh-process: 1` forgets the indexes held in process memory first, as a new Lambda
container would.

    uvicorn bench.listing_app:app
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from bench.listing_baseline import StraightforwardStore
from handlers.app import app
from handlers.aws import s3_client
from handlers.dependencies import SettingsDep, training_data_store
from handlers.flag_index import clear_index_cache
from handlers.training_data_store import TrainingDataStore


async def bench_store(
    request: Request, settings: SettingsDep, s3: Annotated[Any, Depends(s3_client)]
) -> TrainingDataStore:
    if request.headers.get("x-bench-fresh-process") == "1":
        clear_index_cache()
    variant = request.headers.get("x-bench-store", "indexed")
    if variant == "baseline":
        return StraightforwardStore(s3, settings.s3_bucket, 1)
    if variant == "concurrent":
        return TrainingDataStore(s3, settings.s3_bucket, settings.s3_max_concurrency, use_index=False)
    return TrainingDataStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


app.dependency_overrides[training_data_store] = bench_store
