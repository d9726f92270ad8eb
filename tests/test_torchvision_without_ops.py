"""open_clip and transformers import beside PyPI's torchvision, in the test process and in every
Python it starts (tests/torchvision_without_ops.py; README, "Real models")."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip", reason="install tsvmerge[models] (the [test] extra includes it)")


def test_a_python_the_tests_start_imports_open_clip_and_transformers():
    code = "import open_clip, transformers; from transformers import CLIPModel; print(open_clip.create_model)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_torchvision_ops_fail_clearly_where_they_did_not_load():
    import torchvision
    import torchvision.ops
    if torchvision.extension._has_ops():
        pytest.skip("this torchvision's compiled ops loaded (a matching build)")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
