"""Test setup: CPU backend with 8 forced host devices, set before jax is imported.

LLVM optimisation level 0: the suite is almost all compilation of tiny programs, which this
makes about twice as fast; every comparison in it is against a reference computed under
the same flags (subprocesses inherit them) or a tolerance.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def exact_float32_matmuls():
    """Full float32 matmuls on every backend (GPUs default to TF32 for float32 dots); a
    module takes it with ``pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")``."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
