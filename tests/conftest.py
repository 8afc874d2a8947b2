""" Shared pytest set-up.

Temporary files: pytest keeps a test's ``tmp_path`` only when the test fails, and only for the last
run (``tmp_path_retention_policy`` / ``tmp_path_retention_count`` in pyproject.toml); every other
temporary file of the run goes into pytest's temp folder too (``session_temp_folder``), so a run
leaves in ``TMPDIR`` only the patched copy of timm's test file and the tmp_path of failed tests.
"""
import os
import shutil
import tempfile

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
def session_temp_folder(tmp_path_factory):
    """ Every temporary file of the run, this process's and its subprocesses', in a folder of pytest's
    temp folder (``tempfile`` and ``TMPDIR``), removed at the end of the run whatever its outcome.

    That takes in torch.compile's inductor cache (with its 150 MB precompiled header, which ignores
    ``TORCHINDUCTOR_CACHE_DIR``; the default, ``TMPDIR/torchinductor_<user>``, outlives the run and is
    shared with runs of other checkouts, whose graphs were compiled against another version of the op),
    pip's build folders and the temp folders of nested pytest runs. The patched copy of timm's test file
    (``tests/test_timm_models.py``, 0.1 MB) stays cached in the system temp folder.
    """
    system = tempfile.gettempdir()
    path = tmp_path_factory.mktemp('tmp')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('DGMN_TIMM_TIMM_TESTS',
                  os.environ.get('DGMN_TIMM_TIMM_TESTS') or os.path.join(system, 'dgmn_timm_timm_tests'))
        mp.setenv('TMPDIR', str(path))
        # inductor pins its cache folder in this variable on first use; a fresh one per run, so that no graph
        # compiled against another version of the op is reused
        mp.setenv('TORCHINDUCTOR_CACHE_DIR', str(path / 'torchinductor'))
        mp.setattr(tempfile, 'tempdir', str(path))
        yield
    shutil.rmtree(path, ignore_errors=True)
