"""Request bodies of Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens).

Unknown fields are ignored, not refused as Anthropic refuses them: Claude Code and the SDK send
newer fields (cache_control, context_management, service_tier, ...) before a local server learns
them, and none of them changes what this server can do with a request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_LENIENT = ConfigDict(extra="ignore")


class TextBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str


class Base64ImageSource(BaseModel):
    model_config = _LENIENT
    type: Literal["base64"]
    media_type: str
    data: str


class URLImageSource(BaseModel):
    model_config = _LENIENT
    type: Literal["url"]
    url: str


class ImageBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["image"]
    source: Annotated[Base64ImageSource | URLImageSource, Field(discriminator="type")]


class ToolUseBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool = False


class ThinkingBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    """Thinking Anthropic's servers encrypted; it has nothing this model can read, so it is dropped."""

    model_config = _LENIENT
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock, Field(discriminator="type")]


class InputMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(BaseModel):
    model_config = _LENIENT
    name: str = Field(min_length=1, max_length=256)
    type: str | None = None  # "custom" or absent; Anthropic's server tools (web_search_..., bash_...) are refused
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(BaseModel):
    model_config = _LENIENT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    model_config = _LENIENT
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: Annotated[int, Field(ge=0)] | None = None


class OutputFormat(BaseModel):
    model_config = _LENIENT
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = _LENIENT
    format: OutputFormat | None = None
    effort: str | None = None  # accepted, not acted on


class PromptFields(BaseModel):
    """What both routes render into a prompt."""

    model_config = _LENIENT
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class CountTokensRequest(PromptFields):
    pass


class MessagesRequest(PromptFields):
    max_tokens: Annotated[int, Field(ge=1, le=1 << 31)]
    stop_sequences: Annotated[list[str], Field(max_length=64)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 31)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted, not acted on
