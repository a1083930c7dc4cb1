import os
from pathlib import Path

import pytest

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
