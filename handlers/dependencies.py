"""FastAPI dependencies that hand routes their typed stores."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends

from handlers.aws import s3_client
from handlers.settings import Settings, get_settings
from handlers.training_data_store import TrainingDataStore

SettingsDep = Annotated[Settings, Depends(get_settings)]


async def training_data_store(settings: SettingsDep, s3: Annotated[Any, Depends(s3_client)]) -> TrainingDataStore:
    return TrainingDataStore(s3, settings.s3_bucket, settings.s3_max_concurrency)


TrainingDataStoreDep = Annotated[TrainingDataStore, Depends(training_data_store)]
