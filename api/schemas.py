"""Response shapes for the OpenAPI document.

The routes build plain dicts (the CLI's JSON contracts) and return them as
they are; these models describe them in ``/openapi.json``. They allow extra
keys, so a contract that grows a field stays valid.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    code: str = Field(description="Machine-readable reason, e.g. too_large, pickle_refused, truncated.")
    message: str = Field(description="One line for people; names the uploaded file where there is one.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class QueryResult(_Open):
    id: int
    name: str
    source: Optional[str] = None
    path: Optional[str] = None
    file_sha256: Optional[str] = None
    autov3: Optional[str] = None
    family: Optional[str] = None
    format: Optional[str] = None
    score: float
    exact: Optional[bool] = None
    labels: list[str] = []


class QueryResponse(_Open):
    """Same JSON as ``lorasearch query --json`` (``query`` is the uploaded file's name), plus ``query_lora``."""

    family: str
    view: str
    exact: bool
    results: list[QueryResult]
    message: Optional[str] = None
    query: Optional[str] = None
    query_lora: Optional[dict[str, Any]] = Field(None, description="The uploaded LoRA: format, family, modules, rank, dtype, hashes.")


class CompareResponse(_Open):
    """Same JSON as ``lorasearch compare --json``."""

    family_a: str
    family_b: str
    shared_modules: int
    only_a: int
    only_b: int
    cosine: Optional[float] = None
    coefficient: Optional[float] = None
    exact: bool = True


class LoraSummary(_Open):
    id: int
    name: str
    family: str
    format: str
    file_sha256: Optional[str] = None
    autov3: str
    labels: list[str] = []


class LoraList(BaseModel):
    loras: list[LoraSummary]
    limit: int
    offset: int
    count: int = Field(description="How many are in this page.")


class AddResponse(BaseModel):
    id: int
    added: bool = Field(description="False when the same content (AutoV3) was already indexed.")
    lora: dict[str, Any]


class DeleteResponse(BaseModel):
    id: int
    deleted: bool


class Family(BaseModel):
    family: str
    count: int


class Families(BaseModel):
    families: list[Family]


class Health(BaseModel):
    status: str
    generation: int


class MapPoint(_Open):
    id: int
    name: str
    x: float
    y: float
    labels: list[str] = []


class CollectionMap(_Open):
    family: str
    view: str
    method: Optional[str] = Field(None, description="umap or pca; null while a new family's first map is computed.")
    points: list[MapPoint]
    count: int = Field(0, description="Live LoRAs of the family now.")
    unplaced: list[int] = Field([], description="Ids of live LoRAs added since the layout: not on the map yet.")
    stale: bool = Field(False, description="The store changed since the layout (a refresh follows writes).")
    refreshing: bool = Field(False, description="This server process has a map refresh pending or running.")


class AttributionMatch(_Open):
    id: int
    name: Optional[str] = None
    source: Optional[str] = None
    path: Optional[str] = None
    cosine: Optional[float] = Field(None, description="Cosine of the match's ΔW with the target's, over shared modules.")
    coefficient: Optional[float] = Field(None, description="Estimated weight of the match's ΔW in the target (negative allowed).")
    fpr: float = Field(description="Calibrated false-positive rate of the match's score.")


class AttributionFile(_Open):
    path: str
    kind: str
    family: Optional[str] = None
    verdict: str
    explained: float
    matches: list[AttributionMatch] = []


class AttributeResponse(_Open):
    """Same JSON as ``lorasearch attribute --json`` (``target`` is the uploaded file's name)."""

    target: str
    family: Optional[str] = None
    verdict: str = Field(description="derived (one significant source), merged (several) or none.")
    explained: float = Field(description="Share of the target's ‖ΔW‖² the matches account for.")
    matches: list[AttributionMatch]
    per_file: list[AttributionFile]
    base_model: list[str] = []
    base: Optional[str] = None
    thresholds: dict[str, Any] = {}
