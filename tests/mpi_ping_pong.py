"""Run under mpiexec by tests/test_calibrate_hosts.py: ``calibrate_hosts`` with each rank a
"host" (its measurement a fixed fake of rank + 1 GPUs; the pairs timed for real on host
memory over MPI); rank 0 writes the fits to DIR/pairs.json and the topology to DIR/hosts.toml."""
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from clustersim.calibration.hosts import calibrate_hosts, hosts_topology_text  # noqa: E402
from test_gpucal import result  # noqa: E402

comm = MPI.COMM_WORLD
exchange = (lambda n: np.ones(n, np.uint8), lambda b, r: comm.Send(b, r), lambda b, r: comm.Recv(b, r),
            lambda: None, [2**10, 2**16, 2**20], 3)
out = calibrate_hosts(comm, lambda: result(comm.rank + 1), exchange)
if comm.rank == 0:
    results, pairs = out
    Path(sys.argv[1], "pairs.json").write_text(json.dumps(pairs))
    Path(sys.argv[1], "hosts.toml").write_text(hosts_topology_text("ranks", results, pairs))
else:
    assert out is None
