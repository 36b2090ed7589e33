"""Test set-up: 8 forced host devices (unless the caller chose), float32 reference precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# 8 fake devices on 2 shared cores: a collective's participants can arrive a minute apart under
# load, and XLA aborts the process when a CPU rendezvous exceeds its terminate timeout (40 s by
# default). 300 s tolerates the load; a real hang (e.g. too many queued sharded steps, see
# training.bound_in_flight) still fails in minutes rather than taking the CI budget.
for _flag in ("--xla_cpu_collective_call_terminate_timeout_seconds=300",
              "--xla_cpu_collective_timeout_seconds=300"):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
