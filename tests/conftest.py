import json
import os
from pathlib import Path

import pytest

# The Triton kernels (src/qwen35/kernels/triton_*.py) run on CUDA; without a GPU their tests run
# them in Triton's interpreter on CPU tensors. The switch is read when a kernel is defined, so it
# is set before any test module imports one.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("QWEN35_MEMCHECK", "1") != "0":
    import triton_memcheck

    try:  # bounds and races checked as compute-sanitizer would on a GPU (QWEN35_MEMCHECK=0: off, ~7% faster)
        triton_memcheck.install()
    except ImportError:  # no triton: the kernels' tests skip
        pass

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("QWEN35_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
FIXTURES_MISSING = (
    f"test fixtures not found at {FIXTURES}: set QWEN35_FIXTURES to the shared fixtures folder "
    "(../shared/fixtures beside the repo in this workplace; CI always has it)"
)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(FIXTURES_MISSING)
    return FIXTURES


@pytest.fixture(scope="session")
def dense_hf(fixtures) -> Path:
    """The tiny dense HF checkpoint (with its vision tower) that transformers' references came from."""
    return fixtures / "tiny" / "dense-hf"


@pytest.fixture(scope="session")
def hf_tokenizer(dense_hf):
    """transformers' own tokenizer of the tiny checkpoint: the reference for rendered prompts."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(dense_hf)


@pytest.fixture(scope="session")
def dense_sequences(fixtures) -> dict:
    """The dense fixture's reference sequences (transformers' prompt ids and greedy tokens, ref/dense.json)."""
    return json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]


@pytest.fixture(scope="session")
def dense_tokenizer(dense_hf):
    """Our tokenizer of the tiny dense checkpoint."""
    from qwen35 import load_tokenizer

    return load_tokenizer(dense_hf)


def fast_ops_or_skip():
    """torch.ops.qwen35_ggml, the C++ kernels (kernels/csrc), or a skip where they cannot be built."""
    from qwen35.kernels import fast_cpu

    if not fast_cpu.available():
        pytest.skip("fast CPU kernels unavailable here")
    return torch.ops.qwen35_ggml


@pytest.fixture
def two_threads_at_least():
    """Long contexts split over the threads only where there are several: make sure there are."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def triton_devices() -> list[str]:
    """Where the Triton kernels' tests run: the GPU when there is one, else the interpreter on CPU."""
    return ["cuda"] if _HAS_CUDA else ["cpu"]


def random_delta_rule_inputs(batch, heads, length, d_k, d_v, generator, max_decay: float = 2.0):
    """q, k l2-normed (q scaled), v, g in (-max_decay, 0], beta in (0, 1) and a non-zero state: what the
    model feeds the delta rule (kernels/delta_rule.py's layouts)."""
    import torch

    q, k = (torch.nn.functional.normalize(torch.randn(batch, heads, length, d_k, generator=generator), dim=-1)
            for _ in range(2))
    v = torch.randn(batch, heads, length, d_v, generator=generator)
    g = -torch.rand(batch, heads, length, generator=generator) * max_decay
    beta = torch.sigmoid(torch.randn(batch, heads, length, generator=generator))
    state = torch.randn(batch, heads, d_k, d_v, generator=generator) * 0.3
    return q * d_k**-0.5, k, v, g, beta, state


def serve_greedily(model, prompts, new_tokens, max_running: int, context_length: int = 512,
                   speculation=None) -> list[list[int]]:
    """Token ids EngineService gives each prompt (greedy, `new_tokens[i]` each, end-of-text ignored),
    all submitted at once to one service: rows join and leave its running batch as they finish."""
    import asyncio

    from qwen35.engine.generate import resolve_sampling
    from qwen35.engine.service import EngineService, GenerationRequest

    async def served():
        service = EngineService(model, max_running=max_running, context_length=context_length, speculation=speculation)
        service.start(asyncio.get_running_loop())

        async def one(prompt, count):
            params = resolve_sampling(model, count, temperature=0)
            handle = service.submit(GenerationRequest(prompt, params, count, ignore_eos=True))
            return [t.token_id async for output in handle for t in output.tokens]

        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, new_tokens)))
        finally:
            service.close()

    return asyncio.run(served())
