import pytest


@pytest.fixture(params=["batch", "single"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every outbound scenario runs on both transports."""
    return request.param
