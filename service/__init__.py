"""convserve's HTTP service.

Importing the package sets one process-wide runtime default before torch can load its OpenMP library
(this module runs before any `service.*` submodule, under `python -m service` and under
`uvicorn service.app:create_app --factory` alike):

OMP_WAIT_POLICY=PASSIVE. libgomp's default is to spin-wait between parallel regions. In a server the
model's OpenMP threads share the cores with decode threads and the event loop, so a spinning thread
burns a core another thread needs, and a parallel region stalls whenever one of its threads is parked
behind a decode: measured on 2 cores, 9x lower throughput (docs/benchmarks.md). libgomp reads the
variable once, when it is loaded, so it must be set before `import torch`; an operator's own value
wins (setdefault), and `service.app` warns when torch was imported first without it.
"""

import os
import sys

# False when torch (and so libgomp, which reads its environment once) was loaded before this line
# without the operator choosing a policy: setting it now would change nothing.
OMP_POLICY_APPLIED = "torch" not in sys.modules or "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
