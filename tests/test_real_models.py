"""Real checkpoints in, loadable models out (issue 13), on tiny real models built offline:
Hugging Face CLIP folders, open_clip state dicts, the TSV paper's checkpoints (`model.`-prefixed
state dicts and whole pickled ImageEncoder modules), `convert`, and the model files that a
merged or decompressed folder carries from its base folder."""
import json
import os

import pytest
import torch

import real_models as rm  # first: it sets the offline switches before transformers reads them

transformers = pytest.importorskip("transformers", reason="install tsvmerge[models] (the [test] extra includes it)")
pytest.importorskip("open_clip", reason="install tsvmerge[models] (the [test] extra includes it)")

import tsvmerge  # noqa: E402
from tsvmerge.cli import main  # noqa: E402
from tsvmerge.io import InputError, load_file, save_file  # noqa: E402
from tsvmerge.io.model_files import model_files  # noqa: E402

T = 3
# A merge read back from disk against the same merge in memory: the same arithmetic on the same
# numbers (bit-identical here; BLAS may round differently for differently aligned buffers).
SAME = 1e-6


def cli(*args) -> None:
    assert main([str(a) for a in args]) == 0


def no_key_problems(info: dict) -> bool:
    return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


# -- Hugging Face CLIP ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return rm.hf_clip_family(tmp_path_factory.mktemp("hf_clip"), T, rm.stable_seed("hf_clip"))


def test_hf_clip_merged_folder_is_a_model(hf_clip, tmp_path, capsys):
    base, tasks, model = hf_clip
    out = tmp_path / "merged"
    cli("merge", base, *tasks, "-o", out, "--preset", "clip", "--no-progress")
    printed = capsys.readouterr().out

    merged, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert no_key_problems(info), info
    want = tsvmerge.merge(model.state_dict(), [transformers.CLIPModel.from_pretrained(t).state_dict() for t in tasks],
                          preset="clip")
    assert rm.max_relative_error(merged.state_dict(), want) <= SAME
    assert rm.max_relative_error(want, model.state_dict()) > 1e-3  # the merge moved the weights

    rep = json.loads((out / "tsvmerge_report.json").read_text())
    path = {name: e["path"] for name, e in rep["tensors"].items()}
    assert path["text_projection.weight"] == "dense"  # the paper's CLIP preset
    assert path["visual_projection.weight"] == "spectral"
    for tower in ("vision_model", "text_model"):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert path[f"{tower}.encoder.layers.1.self_attn.{p}.weight"] == "spectral"
    assert rep["carried"] == ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert "carried from the base folder: config.json, processor_config.json" in printed
    text = ["a photo of a cat", "a dog"]
    assert (transformers.CLIPProcessor.from_pretrained(out)(text=text)["input_ids"]
            == transformers.CLIPProcessor.from_pretrained(base)(text=text)["input_ids"])


def _rename(folder, prefix: str) -> None:
    """Rewrite a saved model's names with `prefix`, as transformers 4 saves a CLIPVisionModel."""
    path = os.path.join(folder, "model.safetensors")
    save_file({prefix + k: v for k, v in load_file(path).items()}, path, {"format": "pt"})


@pytest.mark.parametrize("renamed", ["a task", "the base"])
def test_hf_clip_vision_names_of_transformers_4_and_5(tmp_path, renamed):
    """transformers 5 saves CLIPVisionModel without the `vision_model.` prefix that 4 writes; a
    merge across the two keeps the base's names, and the result loads."""
    base, tasks, model = rm.hf_clip_family(tmp_path, T, rm.stable_seed(renamed), vision_only=True)
    want = tsvmerge.merge(model.state_dict(), [load_file(os.path.join(t, "model.safetensors")) for t in tasks],
                          preset="clip")
    _rename(tasks[1] if renamed == "a task" else base, "vision_model.")
    out = tmp_path / "merged"
    rep = tsvmerge.merge(base, tasks, preset="clip", out=str(out))

    stored = load_file(str(out / "model.safetensors"))
    assert all(k.startswith("vision_model.") == (renamed == "the base") for k in stored)
    notes = [n for entry in rep["inputs"] for n in entry.get("notes", ())]
    assert len(notes) == (1 if renamed == "a task" else T) and "'vision_model.'" in notes[0]
    merged, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert no_key_problems(info), info
    assert rm.max_relative_error(merged.state_dict(), want) <= SAME


def test_decompressed_folder_is_a_model(hf_clip, tmp_path):
    base, tasks, _ = hf_clip
    tsvmerge.compress(base, tasks[0], rank=0.5, out=str(tmp_path / "ft0.tsvc.safetensors"))
    rep = tsvmerge.decompress(base, str(tmp_path / "ft0.tsvc.safetensors"), out=str(tmp_path / "ft0"))
    assert rep["carried"] == ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    _, info = transformers.CLIPModel.from_pretrained(tmp_path / "ft0", output_loading_info=True)
    assert no_key_problems(info), info


def test_only_model_files_are_carried(hf_clip, tmp_path):
    """Top-level config, processor and tokenizer files, regular or linked (copied as files); never
    weights, indexes, sub-folders, links to nothing, FIFOs, or other files."""
    base, tasks, _ = hf_clip
    folder = tmp_path / "base"
    os.makedirs(folder / "checkpoint-10")
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json"):
        os.symlink(os.path.join(base, name), folder / name)           # as in a Hugging Face cache
    (folder / "tokenizer.json").write_bytes(open(os.path.join(base, "tokenizer.json"), "rb").read())
    (folder / "README.md").write_text("the base's model card\n")
    (folder / "training_args.bin").write_bytes(b"\x80\x04N.")
    (folder / "checkpoint-10" / "config.json").write_text("{}")
    os.symlink(tmp_path / "nowhere.json", folder / "generation_config.json")
    os.mkfifo(folder / "vocab.json")                                   # opening it would block

    want = ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert model_files(str(folder)) == want
    out = tmp_path / "merged"
    tsvmerge.merge(str(folder), tasks, out=str(out))
    assert sorted(os.listdir(out)) == sorted(want + ["model.safetensors", "model.safetensors.index.json",
                                                     "tsvmerge_report.json"])
    assert not any(os.path.islink(out / name) for name in want)
    assert (out / "config.json").read_bytes() == open(os.path.join(base, "config.json"), "rb").read()


# -- open_clip --------------------------------------------------------------------------------
def test_open_clip_state_dicts_plain_wrapped_and_ddp(tmp_path):
    """Saved as open_clip users save them: a plain state dict, {"state_dict": ...} with training
    state beside it, and DDP's `module.` prefix; the merge loads into open_clip.create_model."""
    oc = rm.open_clip()
    state = rm.open_clip_model().state_dict()
    seed = rm.stable_seed("open_clip")
    fts = [rm.fine_tune(state, seed + t) for t in range(T)]
    torch.save(state, tmp_path / "base.pt")
    torch.save(fts[0], tmp_path / "plain.pt")
    torch.save({"epoch": 3, "name": "run", "state_dict": fts[1]}, tmp_path / "wrapped.pt")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in fts[2].items()}}, tmp_path / "ddp.pt")
    out = tmp_path / "merged"
    cli("merge", tmp_path / "base.pt", tmp_path / "plain.pt", tmp_path / "wrapped.pt", tmp_path / "ddp.pt",
        "-o", out, "--preset", "clip", "--no-progress")

    model = oc.create_model(rm.OPEN_CLIP_NAME)
    missing, unexpected = model.load_state_dict(load_file(str(out / "model.safetensors")))
    assert not missing and not unexpected
    want = tsvmerge.merge(state, fts, preset="clip")
    assert rm.max_relative_error(model.state_dict(), want) <= SAME
    rep = json.loads((out / "tsvmerge_report.json").read_text())
    assert rep["inputs"][3]["notes"] == ["names read under the base's: prefix 'module.' taken as ''"]
    assert rep["tensors"]["text_projection"]["path"] == "dense" and rep["tensors"]["visual.proj"]["path"] == "spectral"


def test_names_that_differ_otherwise_stay_an_error(tmp_path):
    state = rm.open_clip_model().state_dict()
    extra = {"module." + k: v for k, v in state.items()} | {"module.head.weight": torch.ones(2, 2)}
    with pytest.raises(InputError, match=r"extra\.pt: tensor 'head\.weight': not in the base"):
        tsvmerge.merge(state, [_saved(tmp_path / "extra.pt", extra)])
    other = {"encoder." + k: v for k, v in state.items()}
    with pytest.raises(InputError, match=r"other\.pt: tensor '.+': missing \(the base"):
        tsvmerge.merge(state, [_saved(tmp_path / "other.pt", other)])


def _saved(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


# -- the TSV paper's checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """zeroshot.pt and TASK/finetuned.pt as the task-vectors code writes them: whole pickled
    ImageEncoder modules; returns (folder, zeroshot state dict, fine-tuned state dicts)."""
    folder = tmp_path_factory.mktemp("paper")
    zeroshot = rm.ImageEncoder()
    torch.save(zeroshot, folder / "zeroshot.pt")
    seed = rm.stable_seed("paper")
    states = []
    for t in range(T):
        encoder = rm.ImageEncoder()
        encoder.load_state_dict(rm.fine_tune(zeroshot.state_dict(), seed + t))
        os.makedirs(folder / f"task{t}")
        torch.save(encoder, folder / f"task{t}" / "finetuned.pt")
        states.append(encoder.state_dict())
    return folder, zeroshot.state_dict(), states


def _paper_tasks(folder):
    return [str(folder / f"task{t}" / "finetuned.pt") for t in range(T)]


def test_pickled_modules_are_refused_in_one_sentence(paper, tmp_path, capsys):
    folder, _, _ = paper
    with pytest.raises(InputError) as e:
        tsvmerge.merge(str(folder / "zeroshot.pt"), _paper_tasks(folder))
    message = str(e.value)
    assert "pickled real_models.ImageEncoder" in message and "--trust-pickle" in message
    assert "\n" not in message and "\x1b" not in message and "Weights only" not in message
    assert main(["merge", str(folder / "zeroshot.pt"), *_paper_tasks(folder), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zeroshot.pt" in err and "--trust-pickle" in err
    assert not os.path.exists(tmp_path / "m")
    assert main(["convert", str(folder / "zeroshot.pt"), str(tmp_path / "z.safetensors")]) == 2
    assert not os.path.exists(tmp_path / "z.safetensors")
    assert main(["inspect", str(folder / "zeroshot.pt")]) == 2
    capsys.readouterr()
    cli("inspect", folder / "zeroshot.pt", "--trust-pickle")
    assert "note: a pickled ImageEncoder module, unpickled in full" in capsys.readouterr().out


def test_trusted_pickles_merge_and_load_into_the_image_encoder(paper, tmp_path):
    folder, zeroshot, states = paper
    rep = tsvmerge.merge(str(folder / "zeroshot.pt"), _paper_tasks(folder), preset="clip", out=str(tmp_path / "m"),
                         trust_pickle=True)
    for entry in rep["inputs"]:
        assert entry["notes"] == ["a pickled ImageEncoder module, unpickled in full (trust_pickle); "
                                  "its state_dict() was used"]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert rm.max_relative_error(merged, tsvmerge.merge(zeroshot, states, preset="clip")) <= SAME
    encoder = rm.ImageEncoder()
    missing, unexpected = encoder.load_state_dict(merged)  # the base's names: model.visual...
    assert not missing and not unexpected


def test_convert_once_then_merge_without_trust(paper, tmp_path, capsys):
    folder, zeroshot, states = paper
    inputs = [folder / "zeroshot.pt", *_paper_tasks(folder)]
    converted = []
    for i, path in enumerate(inputs):
        converted.append(tmp_path / f"{i}.safetensors")
        cli("convert", path, converted[-1], "--trust-pickle")
    assert "unpickled in full" in capsys.readouterr().out
    assert load_file(str(converted[0])).keys() == zeroshot.keys()
    assert all(torch.equal(load_file(str(converted[0]))[k], v) for k, v in zeroshot.items())
    assert main(["convert", str(inputs[0]), str(converted[0]), "--trust-pickle"]) == 2  # never replaced silently
    got = tsvmerge.merge(str(converted[0]), [str(c) for c in converted[1:]], preset="clip")
    assert rm.max_relative_error(got, tsvmerge.merge(zeroshot, states, preset="clip")) <= SAME


def test_state_dicts_of_the_official_code_load_weights_only(paper, tmp_path):
    """The official code's state dicts (`model.`-prefixed) load with weights_only, beside a pickled
    module, a plain open_clip-named one and a DDP-wrapped one; the output keeps the base's names."""
    folder, zeroshot, states = paper
    base = _saved(tmp_path / "zeroshot_sd.pt", zeroshot)
    tasks = [str(folder / "task0" / "finetuned.pt"),
             _saved(tmp_path / "t1.pt", {k.removeprefix("model."): v for k, v in states[1].items()}),
             _saved(tmp_path / "t2.pt", {"state_dict": {"module." + k: v for k, v in states[2].items()}})]
    with pytest.raises(InputError, match="finetuned.pt: holds a pickled"):
        tsvmerge.merge(base, tasks)
    got = tsvmerge.merge(base, tasks, preset="clip", trust_pickle=True)
    assert all(k.startswith("model.") for k in got)
    assert rm.max_relative_error(got, tsvmerge.merge(zeroshot, states, preset="clip")) <= SAME
