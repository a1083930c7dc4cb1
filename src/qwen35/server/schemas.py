"""Request bodies of the OpenAI and Ollama APIs, as pydantic models.

Validation here gives wrong types and out-of-range values a 422 naming the field before any
work starts. Fields we accept but do not act on (`user`, `keep_alive`, ...) are declared so that
clients which send them keep working (`parallel_tool_calls` false keeps the first call only);
unknown extra fields are ignored, as OpenAI's clients send new ones before servers learn them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_LENIENT = ConfigDict(extra="ignore")
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1, le=1 << 31)]
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=1 << 31)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
Stop = str | Annotated[list[str], Field(max_length=64)]


# --- OpenAI -----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _LENIENT
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = _LENIENT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = _LENIENT
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    model_config = _LENIENT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDefinition(BaseModel):
    model_config = _LENIENT
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _LENIENT
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _LENIENT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = _LENIENT
    include_usage: bool = False


class SamplingOptions(BaseModel):
    """The sampling options of every OpenAI-style request (top_k, min_p, the penalties and seed are
    the usual local-server extensions)."""

    model_config = _LENIENT
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None


class SamplingFields(SamplingOptions):
    """Options shared by chat and text completions."""

    max_tokens: TokenCount | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1  # more than one: refused with a clear 400
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Qwen's (DashScope's) name: most reasoning tokens, then </think> is inserted (-1: unlimited, 0: no
    # thinking; None: the server's --reasoning-budget). See engine/reasoning_budget.py.
    thinking_budget: Annotated[int, Field(ge=-1)] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(union_mode="left_to_right")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None


# --- Ollama -----------------------------------------------------------------------------------


class OllamaOptions(BaseModel):
    model_config = _LENIENT
    num_predict: Annotated[int, Field(ge=-2, le=1 << 31)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None


class OllamaToolFunction(BaseModel):
    model_config = _LENIENT
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    model_config = _LENIENT
    function: OllamaToolFunction


class OllamaMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class OllamaBase(BaseModel):
    model_config = _LENIENT
    model: str
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None


class OllamaShowRequest(BaseModel):
    model_config = _LENIENT
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool | None = None
