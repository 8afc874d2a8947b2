""" Shared pytest set-up.

Temporary files: pytest keeps a test's ``tmp_path`` only when the test fails, and only for the last
run (``tmp_path_retention_policy`` / ``tmp_path_retention_count`` in pyproject.toml); torch.compile's
cache goes into the run's temp folder too (``compile_cache``), so a passing run leaves nothing
behind in ``TMPDIR`` but the patched copy of timm's test file (``tests/test_timm_models.py``).
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """ One intra-op thread for the whole run.

    The tests use tiny inputs, where OpenMP threads cost more than they give, and on a busy
    2-core machine waiting threads make them up to 10x slower. Subprocess tests set
    OMP_NUM_THREADS=1 for the same reason.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope='session')
def compile_cache(tmp_path_factory):
    """ torch.compile's inductor (and Triton) cache in this run's temp folder, for this process and the
    subprocesses it starts: removed with the folder, and never shared with a run of another checkout
    (the default, ``TMPDIR/torchinductor_<user>``, outlives the run and serves graphs compiled against
    another version of the op). A ``TORCHINDUCTOR_CACHE_DIR`` set by the user is kept. """
    if os.environ.get('TORCHINDUCTOR_CACHE_DIR'):
        yield
        return
    path = tmp_path_factory.mktemp('torch_compile_cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCHINDUCTOR_CACHE_DIR', str(path))
        mp.setenv('TRITON_CACHE_DIR', str(path / 'triton'))
        yield
