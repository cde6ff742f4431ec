"""Test setup: 8 fake CPU devices (so sharding is exercised) before any JAX backend starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With several fake devices the XLA CPU thread pool can deadlock unless it has >= 2x threads.
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
