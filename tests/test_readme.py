"""The README's "Real models" examples, run as written, on tiny models built offline.

A block marked `<!-- test: GROUP -->` runs with the other blocks of its group, in order, in one
folder and one Python namespace: `tsvmerge ...` lines through the command line's `main`
(globs expanded as a shell would), Python with `exec`. Each test lays out the files the
group's commands name; open_clip's "ViT-B-32" is the tiny config there.
"""
import glob
import json
import os
import re
import shlex

import pytest
import torch

import real_models as rm  # first: it sets the offline switches before transformers reads them

pytest.importorskip("transformers", reason="install tsvmerge[models] (the [test] extra includes it)")
pytest.importorskip("open_clip", reason="install tsvmerge[models] (the [test] extra includes it)")

from tsvmerge.cli import main  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")


def blocks(group: str) -> list[tuple[str, str]]:
    with open(README) as f:
        found = re.findall(r"<!-- test: ([\w-]+) -->\n```(\w+)\n(.*?)```", f.read(), re.S)
    return [(language, code) for name, language, code in found if name == group]


def run_group(group: str, namespace: dict) -> None:
    code = blocks(group)
    assert code, f"the README has no block marked <!-- test: {group} -->"
    for language, text in code:
        if language == "python":
            exec(compile(text, f"README.md [{group}]", "exec"), namespace)
            continue
        assert language == "bash"
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            assert words[0] == "tsvmerge", line
            args = []
            for word in words[1:]:
                matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
                assert matches, f"{word} matches nothing"
                args += matches
            assert main(args) == 0, line


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def vit_b_32(monkeypatch):
    """open_clip, where "ViT-B-32" names the tiny config for this test."""
    oc = rm.open_clip()
    with open(rm.OPEN_CLIP_CONFIG_FILE) as f:
        monkeypatch.setitem(oc.factory._MODEL_CONFIGS, "ViT-B-32", json.load(f))
    return oc


def test_hf_clip(workdir):
    names = ["clip-base", "clip-cars", "clip-dtd", "clip-eurosat"]
    _, _, base = rm.hf_clip_family(workdir, 3, rm.stable_seed("readme hf"), names=names)
    namespace = {}
    run_group("hf-clip", namespace)
    assert rm.max_relative_error(namespace["model"].state_dict(), base.state_dict()) > 1e-3
    assert namespace["processor"](text=["a cat"])["input_ids"]


def test_open_clip(workdir, vit_b_32, capsys):
    state = vit_b_32.create_model("ViT-B-32").state_dict()
    seed = rm.stable_seed("readme open_clip")
    torch.save(state, "ViT-B-32.pt")
    torch.save(rm.fine_tune(state, seed), "cars.pt")
    torch.save({"state_dict": rm.fine_tune(state, seed + 1)}, "dtd.pt")
    ddp = {"module." + k: v for k, v in rm.fine_tune(state, seed + 2).items()}
    torch.save({"epoch": 10, "name": "eurosat", "state_dict": ddp}, "epoch_10.pt")
    image_folder(workdir / "eurosat" / "test", ["Forest", "River"], seed)
    run_group("open-clip", {})
    assert re.search(r"EuroSAT: [01]\.\d{3}", capsys.readouterr().out)


def test_paper_checkpoints(workdir, vit_b_32):
    folder = workdir / "checkpoints" / "ViT-B-32"
    zeroshot = rm.ImageEncoder("ViT-B-32")
    os.makedirs(folder)
    torch.save(zeroshot, folder / "zeroshot.pt")
    for t, task in enumerate(["Cars", "DTD"]):
        encoder = rm.ImageEncoder("ViT-B-32")
        encoder.load_state_dict(rm.fine_tune(zeroshot.state_dict(), rm.stable_seed("readme paper") + t))
        os.makedirs(folder / task)
        torch.save(encoder, folder / task / "finetuned.pt")
    # the README's one untested line, without its download of pretrained weights
    model, _, preprocess = vit_b_32.create_model_and_transforms("ViT-B-32")
    run_group("paper", {"model": model, "preprocess": preprocess})
    merged = model.visual.state_dict()
    assert all(torch.equal(merged[k.removeprefix("model.visual.")], v)
               for k, v in rm.load_merged("tsv-merged").items() if k.startswith("model.visual."))
    assert rm.max_relative_error(rm.load_merged("tsv-merged"), rm.load_merged("tsv-merged-2")) == 0


def test_lora(workdir):
    pytest.importorskip("peft", reason="install tsvmerge[models] (the [test] extra includes it)")
    import peft
    base = rm.llama()
    base.save_pretrained("llama")
    seed = rm.stable_seed("readme lora")
    for t, (name, targets) in enumerate({"lora-math": ["q_proj", "v_proj"], "lora-code": rm.LLAMA_MODULES,
                                         "lora-chat": ["o_proj", "down_proj"]}.items()):
        rm.trained_adapter(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed + t, name)
    namespace = {}
    run_group("lora", namespace)
    want = rm.load_merged("llama-merged")
    assert rm.max_relative_error(want, base.state_dict()) > 1e-3
    from_adapter = namespace["model"].merge_and_unload().state_dict()
    assert rm.max_relative_error(from_adapter, want) < 1e-5


def image_folder(folder, classes, seed, per_class=3):
    """Random RGB images, `per_class` in a sub-folder per class."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    for c in classes:
        os.makedirs(folder / c)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / c / f"{i}.png")
