"""Shared test setup: processed-data cache in a temp dir, quiet absl."""
import pytest
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end runs of the experiment scripts (tens of "
      "seconds each; in the default run, deselect with -m 'not slow')")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("JAXREC_CACHE", str(tmp_path_factory.mktemp("jaxrec_cache")))
  yield
  mp.undo()
