import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test builds into its own cache: no test sees another's packages or the user's."""
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path_factory.mktemp("optgen-cache")))
