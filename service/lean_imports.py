"""Load torchvision models without importing torch._dynamo, the compiler the service does not use
unless `--compile compile` asks for it.

`import torchvision` imports torchvision.ops.roi_align, whose one line `from torch._dynamo.utils import
is_compile_supported` imports all of torch._dynamo (and sympy, torch.fx's symbolic shapes, ...): on
the AMD EPYC Zen 4 machine 2.5 s of start-up and 171 MiB of resident memory, more than everything
else the service adds over a plain endpoint. The function is only called inside roi_align's forward
(detection models; never by a classifier). While a checkpoint is loaded, `defer_dynamo()` puts a
stand-in for that one module in sys.modules: its `is_compile_supported` imports the real module on
first call, and any other name asked of it removes the stand-in and returns the real module's
attribute, so code that does want dynamo still gets it (only later). The stand-in is removed
afterwards, so `import torch._dynamo` from anywhere else (torch.compile) imports the real package.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any

DYNAMO_UTILS = "torch._dynamo.utils"


def _real() -> types.ModuleType:
    current = sys.modules.get(DYNAMO_UTILS)
    if isinstance(current, _Deferred):
        del sys.modules[DYNAMO_UTILS]
    return importlib.import_module(DYNAMO_UTILS)


def is_compile_supported(device_type: Any) -> Any:
    return _real().is_compile_supported(device_type)


class _Deferred(types.ModuleType):
    is_compile_supported = staticmethod(is_compile_supported)

    def __getattr__(self, name: str) -> Any:  # any other name: the real module, imported now
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real(), name)


@contextlib.contextmanager
def defer_dynamo() -> Iterator[None]:
    """Within the block, importing torchvision does not import torch._dynamo (see above). A no-op when
    torch._dynamo or torchvision is already imported."""
    if "torch._dynamo" in sys.modules or DYNAMO_UTILS in sys.modules or "torchvision" in sys.modules:
        yield
        return
    stand_in = _Deferred(DYNAMO_UTILS)
    sys.modules[DYNAMO_UTILS] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]
