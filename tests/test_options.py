"""Options are declared once (methods, backends) and checked everywhere: merge(), get_backend, the CLI."""
import pytest
import torch

import tsvmerge
from tsvmerge.backends import get_backend
from tsvmerge.cli import main

from conftest import ODD_SHAPES, random_zoo


def test_unknown_backend_option_raises():
    with pytest.raises(TypeError, match="power_iter"):
        get_backend("torch", power_iter=2)
    with pytest.raises(TypeError, match="takes: none"):
        get_backend("reference", svd="exact")


@pytest.mark.parametrize("options,match", [
    ({"densty": 0.3}, "densty"),                  # a typo
    ({"k": -1}, "k=-1"),
    ({"k": 2.5}, "k=2.5"),
    ({"orthogonalize": "qr"}, "procrustes"),
    ({"oversample": -3}, "oversample"),
])
def test_bad_merge_options_raise_before_any_work(seed, options, match):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    with pytest.raises((TypeError, ValueError), match=match):
        tsvmerge.merge(base, tasks, method="tsv" if "densty" not in options else "ties", **options)


def test_backend_options_reach_the_backend(seed):
    """krylov and the SVD settings are reachable from merge() and change what runs."""
    base, tasks = random_zoo(seed, 3, {"w": (64, 48)})
    rep = {}
    for krylov in (True, False):
        merged = tsvmerge.merge(base, tasks, backend="torch", krylov=krylov, power_iters=2, oversample=4)
        rep[krylov] = merged["w"]
    assert not torch.equal(rep[True], rep[False])
    r = tsvmerge.merge(base, tasks, backend="torch", krylov=False, out=None, report=None)
    assert set(r) == set(base)


def test_cli_flags_follow_declarations(tmp_path, seed, capsys):
    from tsvmerge.io import save_file
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    paths = []
    for i, sd in enumerate([base] + tasks):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    out = str(tmp_path / "out")
    assert main(["merge", *paths, "-o", out, "--backend", "torch", "--no-krylov", "--power-iters", "2",
                 "--no-progress"]) == 0
    import json, os
    rep = json.load(open(os.path.join(out, "tsvmerge_report.json")))
    assert rep["backend"]["krylov"] is False and rep["backend"]["power_iters"] == 2
    assert rep["backend"]["energy_target"] is None      # the fixed schedule's flags choose it
    for bad in (["--k", "-1"], ["--density", "0.3", "--method", "tsv"], ["--power-iters", "x"],
                ["--backend", "reference", "--svd", "exact"]):
        assert main(["merge", *paths, "-o", str(tmp_path / "o2"), "--no-progress", *bad]) == 2, bad
        assert "error" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2")
