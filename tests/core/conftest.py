from contextlib import contextmanager

import pytest

from hypervisor.core import Hypervisor, VcpuNotRunning, XenError, audit
from hypervisor.core.trace import state_digest

from .guest import Guest


@pytest.fixture
def hv():
    hv = Hypervisor(nr_frames=1 << 14)
    yield hv
    assert audit(hv) == []


@pytest.fixture
def guest(hv):
    return Guest(hv)


@pytest.fixture
def other(hv):
    return Guest(hv)


@contextmanager
def unchanged(hv):
    """Assert the block leaves the whole model (trace.state_digest) as it found it."""
    before = state_digest(hv)
    yield
    assert state_digest(hv) == before, "the model changed"


@contextmanager
def fails_with(hv, errno, *, done=None, match=None):
    """Assert the block raises XenError(errno) (with the given done-count) and that the whole
    model state is exactly as before: a failed entry commits nothing."""
    before = state_digest(hv)
    with pytest.raises(XenError) as caught:
        yield caught
    assert caught.value.errno == errno, caught.value
    if done is not None:
        assert caught.value.done == done
    if match is not None:
        assert match in caught.value.message, caught.value.message
    assert state_digest(hv) == before, "a failed call changed the model"


@contextmanager
def refused(hv, *, match=None):
    """Assert the block's call came from a vCPU that Xen does not run (VcpuNotRunning): the
    model is exactly as before, and the call is neither counted nor traced (it never ran)."""
    before, stats, tracer, traced = state_digest(hv), dict(hv.stats), hv.tracer, []
    hv.tracer = traced.append
    try:
        with pytest.raises(VcpuNotRunning) as caught:
            yield caught
    finally:
        hv.tracer = tracer
    if match is not None:
        assert match in str(caught.value), caught.value
    assert state_digest(hv) == before, "a call from a stopped vCPU changed the model"
    assert (dict(hv.stats), traced) == (stats, [])
