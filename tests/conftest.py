"""Shared test setup: processed-data cache in a temp dir, quiet absl, and
one persistent XLA compilation cache for the whole run."""
import os
import shutil
import sys
import tempfile

import pytest
from absl import logging as absl_logging

# Many tests train the same tiny models in fresh jitted closures, in xdist
# workers and in subprocesses, so the same programs would compile again and
# again; XLA's persistent cache (keyed by the program, so it cannot serve a
# stale one) compiles each once: a third off the suite on 2 cores. The
# controller (or a plain run) makes the directory; workers and subprocesses
# inherit it through the environment. A cache the caller set is kept.
_OWN_XLA_CACHE = None
if ("PYTEST_XDIST_WORKER" not in os.environ
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="jaxrec-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if "jax" in sys.modules:  # Imported before us (a plugin): tell it too.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

absl_logging.set_verbosity(absl_logging.ERROR)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end runs of the experiment scripts (tens of "
      "seconds each; in the default run, deselect with -m 'not slow')")


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE is not None:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny trained run (cli_helpers.TINY), once per test module."""
  # pylint: disable-next=import-outside-toplevel
  from cli_helpers import TINY
  from jaxrec import cli  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp("run"))
  assert cli.main(["train", "--out", out] + TINY) == 0
  return out


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("JAXREC_CACHE", str(tmp_path_factory.mktemp("jaxrec_cache")))
  yield
  mp.undo()
