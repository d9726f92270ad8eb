"""The synthetic zoo: open_clip names and shapes, determinism, interop, spectra."""
import pytest
import safetensors.torch
import torch

from tsvmerge.io import load_file
from tsvmerge.zoo import Arch, make_zoo, make_zoo_dicts, model_shapes

# A tiny ViT with the real naming, so generation takes milliseconds.
TINY = Arch("tiny", width=64, layers=2, patch=16, image=64, output_dim=32)
FC = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def task_vector(base, finetuned, name):
    return finetuned[name].double() - base[name].double()


@pytest.fixture(scope="module", params=["powerlaw", "gapped"])
def b32_stem(request):
    """ViT-B-32's real 2-D shapes outside the blocks (layers=0), 4 tasks: (spectrum, base, tasks)."""
    return (request.param, *make_zoo_dicts("ViT-B-32", tasks=4, layers=0, spectrum=request.param))


@pytest.mark.parametrize("arch,blocks,width,patch,out,params_m", [
    ("ViT-B-32", 12, 768, 32, 512, 87.85),
    ("ViT-B-16", 12, 768, 16, 512, 86.19),
    ("ViT-L-14", 24, 1024, 14, 768, 303.97),
])
def test_shapes_match_open_clip(arch, blocks, width, patch, out, params_m):
    shapes = model_shapes(arch)
    assert len(shapes) == 6 + 12 * blocks + 2
    names = list(shapes)
    assert names[:6] == ["visual.class_embedding", "visual.positional_embedding", "visual.proj",
                         "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"]
    assert names[-2:] == ["visual.ln_post.weight", "visual.ln_post.bias"]
    last = f"visual.transformer.resblocks.{blocks - 1}."
    assert shapes[last + "attn.in_proj_weight"] == (3 * width, width)
    assert shapes[last + "attn.out_proj.weight"] == (width, width)
    assert shapes[last + "mlp.c_fc.weight"] == (4 * width, width)
    assert shapes[last + "mlp.c_proj.weight"] == (width, 4 * width)
    assert shapes["visual.positional_embedding"] == ((224 // patch) ** 2 + 1, width)
    assert shapes["visual.proj"] == (width, out)
    assert shapes["visual.conv1.weight"] == (width, 3, patch, patch)
    # open_clip's published parameter counts of the visual towers
    assert sum(torch.Size(s).numel() for s in shapes.values()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_layers_override_keeps_the_first_blocks():
    shapes = model_shapes("ViT-B-32", layers=2)
    assert sum(".resblocks." in n for n in shapes) == 2 * 12
    assert "visual.transformer.resblocks.1.ln_2.bias" in shapes
    base2, tasks2 = make_zoo_dicts(TINY, tasks=2, layers=1, seed=3)
    base, tasks = make_zoo_dicts(TINY, tasks=2, seed=3)
    for name in base2:
        assert torch.equal(base2[name], base[name]) and torch.equal(tasks2[1][name], tasks[1][name])


def test_unknown_arch_and_spectrum_are_errors():
    with pytest.raises(ValueError, match="ViT-B-32"):
        model_shapes("ViT-H-14")
    with pytest.raises(ValueError, match="gapped"):
        make_zoo_dicts(TINY, tasks=2, spectrum="flat")


def test_base_looks_initialised():
    base, _ = make_zoo_dicts(TINY, tasks=1)
    assert torch.equal(base["visual.ln_pre.weight"], torch.ones(64))
    assert torch.equal(base["visual.transformer.resblocks.1.ln_1.bias"], torch.zeros(64))
    assert base[FC].std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("spectrum", ["powerlaw", "gapped"])
def test_deterministic_and_seed_dependent(spectrum):
    a = make_zoo_dicts(TINY, tasks=3, seed=7, spectrum=spectrum)
    b = make_zoo_dicts(TINY, tasks=3, seed=7, spectrum=spectrum)
    c = make_zoo_dicts(TINY, tasks=3, seed=8, spectrum=spectrum)
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name])
        assert all(torch.equal(x[name], y[name]) for x, y in zip(a[1], b[1]))
    assert not torch.equal(a[1][0][FC], c[1][0][FC])
    # every task moves every floating tensor, and tasks differ
    assert all((ft[name] != a[0][name]).any() for ft in a[1] for name in a[0])
    assert not torch.equal(a[1][0][FC], a[1][1][FC])


def test_files_match_dicts_and_load_with_safetensors(tmp_path):
    zoo = make_zoo(str(tmp_path / "zoo"), TINY, tasks=2, seed=5, dtype=torch.bfloat16, progress=False)
    assert (zoo.arch, zoo.tasks, len(zoo.finetuned)) == ("tiny", 2, 2)
    assert zoo.finetuned[1].endswith("task_02.safetensors")
    base, tasks = make_zoo_dicts(TINY, tasks=2, seed=5, dtype=torch.bfloat16)
    for path, expected in zip([zoo.base] + zoo.finetuned, [base] + tasks):
        theirs = safetensors.torch.load_file(path)  # the independent reader: interop of our writer
        ours = load_file(path)
        assert list(theirs) == list(model_shapes(TINY))  # tensors stored in open_clip order
        for name, tensor in expected.items():
            assert theirs[name].dtype == torch.bfloat16
            assert torch.equal(theirs[name], tensor) and torch.equal(ours[name], tensor)


def test_failed_generation_leaves_no_files(tmp_path, monkeypatch):
    import tsvmerge.zoo as zoo_module

    def broken(*args):
        raise RuntimeError("disk full")
        yield  # a generator, like the real one

    monkeypatch.setattr(zoo_module, "_generate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_zoo(str(tmp_path), TINY, tasks=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_spectra(b32_stem):
    spectrum, base, tasks = b32_stem
    for name in ("visual.proj", "visual.positional_embedding"):
        k = min(base[name].shape) // len(tasks)
        for ft in tasks:
            s = torch.linalg.svdvals(task_vector(base, ft, name))
            assert bool((s[:-1] >= s[1:]).all())
            if spectrum == "gapped":
                assert s[k - 1] / s[k] >= 10, name
                assert s[0] / s[k - 1] < 3  # the strong part decays gently: no single spike
            else:
                assert s[0] / s[9] > 3      # a few strong directions
                assert s[0] / s[-1] > 15    # and a long tail
    s = torch.linalg.svdvals(task_vector(base, tasks[0], "visual.proj"))
    if spectrum == "powerlaw":
        assert s[127] / s[128] < 1.05  # no gap at k = r/T: the hard case of DESIGN section 6


def test_tasks_share_directions(b32_stem):
    """The strongest directions of two tasks overlap more than independent random ones would."""
    _, base, tasks = b32_stem
    name, top = "visual.proj", 16
    m = base[name].shape[0]
    u0, u1 = (torch.linalg.svd(task_vector(base, ft, name), full_matrices=False)[0][:, :top] for ft in tasks[:2])
    overlap = float((u0.T @ u1).norm() ** 2)
    assert overlap > 3 * top * top / m  # top^2/m: the expected overlap of independent subspaces
