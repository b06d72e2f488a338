"""The whole FineTuneJob object (metadata + spec + status)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import API_VERSION, KIND
from .spec import FineTuneJobSpec
from .status import FineTuneJobStatus


class FineTuneJob(BaseModel):
    """A FineTuneJob as stored by the API server (or read from a manifest by the local mode)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation") or 1)

    @property
    def uid(self) -> str:
        return str(self.metadata.get("uid", ""))
