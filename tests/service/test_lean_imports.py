"""Loading a torchvision architecture does not import torch._dynamo (2.5 s and 171 MiB at start-up,
measured on the AMD machine), and the compiler is still there for whoever asks for it afterwards.

Each check runs in a fresh interpreter: whether a module was imported is process-wide state.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mobilenet_v3_small with 2 classes (~6 MB): the smallest torchvision architecture we serve."""
    out = tmp_path_factory.mktemp("tv") / "mobilenet.safetensors"
    code = (
        "import sys\n"
        "from model.checkpoint import CheckpointMeta, save_checkpoint\n"
        "from model.registry import build_model, default_preprocess\n"
        "pre = default_preprocess('mobilenet_v3_small')\n"
        "m = build_model('mobilenet_v3_small', 2, pre.channels, pre.size)\n"
        "save_checkpoint(sys.argv[1], m, CheckpointMeta(arch='mobilenet_v3_small', labels=['a', 'b'],"
        " preprocess=pre.to_dict(), name='mobilenet'))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, timeout=120)
    return out


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_serving_start_up_does_not_import_dynamo(torchvision_checkpoint: Path) -> None:
    out = _python(
        "import sys, torch\n"
        "import service.app, service.__main__\n"
        "from service.settings import load_settings\n"
        "from service.state import build_predictor, warm_up\n"
        "s = load_settings(checkpoint=sys.argv[1], torch_threads=1, runtime='torch')\n"
        "p = build_predictor(s, torch.device('cpu'), s.checkpoint)\n"
        "warm_up(p, s.warmup_sizes(), 1, None, True)\n"
        "print('torchvision' in sys.modules, 'torch._dynamo' in sys.modules, p.folded_bn)\n",
        str(torchvision_checkpoint),
    )
    assert out.split() == ["True", "False", "True"]


def test_dynamo_still_works_after_a_deferred_load(torchvision_checkpoint: Path) -> None:
    """torchvision's roi_align reaches the real is_compile_supported, and `import torch._dynamo`
    later (torch.compile) gets the real package, not the stand-in."""
    out = _python(
        "import sys, torch\n"
        "from service.runtimes import load_source\n"
        "load_source(sys.argv[1])\n"
        "import torchvision.ops\n"
        "boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])\n"
        "r = torchvision.ops.roi_align(torch.ones(1, 1, 4, 4), boxes, output_size=2)\n"
        "import torch._dynamo.utils as u\n"
        "print(tuple(r.shape), type(u).__name__, hasattr(u, 'counters'), 'torch._dynamo' in sys.modules)\n",
        str(torchvision_checkpoint),
    )
    assert out.split() == ["(1,", "1,", "2,", "2)", "module", "True", "True"]


def test_the_service_process_freezes_its_imports(tiny_checkpoint: Path) -> None:
    """`python -m service` moves the import-time objects out of the collector's view before the app
    is built (a full collection then scans the model's objects only); create_app is stubbed."""
    out = _python(
        "import gc, sys, service.app\n"
        "def stop(settings):\n"
        "    print(gc.get_freeze_count() > 100_000)\n"
        "    raise SystemExit(0)\n"
        "service.app.create_app = stop\n"
        "from service.__main__ import main\n"
        "main(['--checkpoint', sys.argv[1], '--port', '0'])\n",
        str(tiny_checkpoint),
    )
    assert out.split() == ["True"]
