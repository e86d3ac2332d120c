"""The `backend` fixture shared by the kernel tests: each kernel path in turn, restored after."""
import pytest

import kernels_pallas as kp

BACKENDS = ["xla", "pallas_interpret", "pallas_triton_interpret"]


@pytest.fixture(params=BACKENDS)
def backend(request):
  before = kp.get_backend()
  kp.set_backend(request.param)
  yield request.param
  kp.set_backend(before)
