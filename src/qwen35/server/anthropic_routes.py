"""Anthropic's Messages API: POST /v1/messages (being built)."""

from fastapi import APIRouter

router = APIRouter()
