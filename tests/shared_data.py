"""Where the tests find the workplace's small real datasets (`../shared/data` beside the
repository, or `$BIGS_JAX_SHARED_DATA`).

A clone made elsewhere has no such folder: the tests that read it then skip with one reason,
and conftest's terminal summary repeats it in a banner, so a run that missed them says so.
"""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository
SHARED_DATA = pathlib.Path(os.environ.get("BIGS_JAX_SHARED_DATA") or ROOT.parent / "shared" / "data")
MISSING = "shared data missing"  # the start of every skip reason given here


def shared_data(*parts: str) -> pathlib.Path:
    """The path `SHARED_DATA/parts...`, or a skip naming it and how to point the tests at it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{MISSING}: {path} not found; run from a checkout beside shared/ or set "
                    "BIGS_JAX_SHARED_DATA=/path/to/shared/data")
    return path
