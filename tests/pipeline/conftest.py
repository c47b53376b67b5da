"""Fixtures the step tests share."""

import pytest

from tests.helpers import collect_snapshot


@pytest.fixture
def snapshot(small_data):
    """``small_data`` (120 shipped rows, 3 intents, half Chinese) published by the real collect step."""
    return collect_snapshot([small_data])
