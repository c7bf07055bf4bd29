"""POST /generate (placeholder until the engine lands)."""

from fastapi import APIRouter

router = APIRouter(tags=["generate"])
