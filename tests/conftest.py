"""Test set-up: 8 forced host devices (unless the caller chose), float32 reference precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# 8 fake devices on 2 shared cores: a collective's participants can arrive minutes apart under
# load, and XLA aborts the process when a CPU rendezvous exceeds its terminate timeout (a worker
# died that way in reference_step once). Waiting longer is correct here; a real hang still ends
# at the timeout.
for _flag in ("--xla_cpu_collective_call_terminate_timeout_seconds=1200",
              "--xla_cpu_collective_timeout_seconds=1200"):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
