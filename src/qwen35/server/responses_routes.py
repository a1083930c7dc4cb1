"""OpenAI's Responses API: POST /v1/responses (being built)."""

from fastapi import APIRouter

router = APIRouter()
