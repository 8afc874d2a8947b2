""" Shared pytest set-up. """
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
