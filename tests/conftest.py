"""Shared test setup: processed-data cache in a temp dir, quiet absl."""
import pytest
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("JAXREC_CACHE", str(tmp_path_factory.mktemp("jaxrec_cache")))
  yield
  mp.undo()
