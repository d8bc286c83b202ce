"""cachefs.memory: chunk-sized buffers are reused from the heap instead of faulted in afresh."""

from __future__ import annotations

import os
import subprocess
import sys

# Four threads each build and serialize 30 protobuf messages carrying 4 MiB and copy them once
# (what gRPC calls with chunk-sized messages do); prints whether the settings took effect and
# the page faults.
PROGRAM = """
import os, resource, threading
from cachefs.memory import tune_malloc
from storage_server.proto import storage_pb2 as pb
tuned = tune_malloc()
assert tune_malloc() == tuned  # idempotent
data = os.urandom(4 << 20)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def work():
    for _ in range(30):
        request = pb.PutRequest(needles=[pb.Needle(key=bytes(32), data=data)]).SerializeToString()
        copy = bytes(memoryview(request)[8:])
        del request, copy
threads = [threading.Thread(target=work) for _ in range(4)]
before = faults()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(tuned, faults() - before)
"""


def run(defaults: bool) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "CACHEFS_MALLOC_DEFAULTS"}
    if defaults:
        env["CACHEFS_MALLOC_DEFAULTS"] = "1"
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_chunk_buffers_come_from_the_heap_not_fresh_pages() -> None:
    tuned, tuned_faults = run(defaults=False)
    untouched, default_faults = run(defaults=True)
    assert tuned and not untouched
    # 240 buffers of 1,024 pages and protobuf's arenas: glibc's defaults fault them in afresh
    assert default_faults > 100_000
    assert tuned_faults < default_faults / 10
