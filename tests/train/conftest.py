"""Fixtures of the train tests."""

import pytest

from tests.fake_gcs import FakeGCS


@pytest.fixture
def gcs(monkeypatch):
    """An in-process fake GCS server; the environment points the GCS clients at it."""
    server = FakeGCS()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    yield server
    server.close()
