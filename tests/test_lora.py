"""PEFT LoRA adapters as tasks, never densified, and a merged LoRA written as a LoRA (issue 13,
items 5 and 6), with real peft on tiny transformers models built offline. The oracle is PEFT's
own densification (`merge_and_unload`) merged through the dense path."""
import copy
import json
import os
import warnings

import pytest
import torch

import real_models as rm  # first: it sets the offline switches before transformers reads them

transformers = pytest.importorskip("transformers", reason="install tsvmerge[models] (the [test] extra includes it)")
peft = pytest.importorskip("peft", reason="install tsvmerge[models] (the [test] extra includes it)")

import tsvmerge  # noqa: E402
from tsvmerge.cli import main  # noqa: E402
from tsvmerge.io import InputError  # noqa: E402
from tsvmerge.io.lora import LoraAdapter  # noqa: E402

LoraConfig = peft.LoraConfig
EXACT = 1e-10       # fp64, the factored path against the densified dense path
FP32 = 1e-4         # a merged adapter loaded by PEFT against the dense merged model


def cli(*args) -> None:
    assert main([str(a) for a in args] + (["--no-progress"] if args[0] == "merge" else [])) == 0


def update_error(got: dict, want: dict, base: dict) -> float:
    """max over tensors that the merge changes of ||got - want|| / ||want - base||; the rest must
    equal the base. Only GPT-2's tied lm_head, which save_pretrained leaves out, may be in one only."""
    worst = 0.0
    assert set(got) ^ set(want) <= {"lm_head.weight"}, sorted(set(got) ^ set(want))[:3]
    for k in set(got) & set(want):
        w = want[k]
        change = (w.double() - base[k].double()).norm()
        if change == 0:
            assert torch.equal(got[k].double(), base[k].double()), k
        else:
            worst = max(worst, float((got[k].double() - w.double()).norm() / change))
    return worst


def densified_merge(model, adapters, backend, others=()):
    """The oracle: each adapter densified by PEFT (fp64), merged through the dense path."""
    base = {k: v.double() for k, v in model.state_dict().items()}
    tasks = [rm.merged_adapter(model, a) for a in adapters] + [{k: v.double() for k, v in o.items()} for o in others]
    return tsvmerge.merge(base, tasks, backend=backend, compute_dtype="float64", out_dtype="float64"), base


LLAMA_CONFIGS = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": LoraConfig(r=3, lora_alpha=5, target_modules=rm.LLAMA_MODULES, use_rslora=True),
    "patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "o_proj"],
                           rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 6},
                           alpha_pattern={"down_proj": 3, "model.layers.0.self_attn.o_proj": 11}),
    "embedding": LoraConfig(r=5, lora_alpha=16, target_modules=["embed_tokens", "up_proj"]),
}


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    model = rm.llama()
    base, adapters = rm.lora_family(tmp_path_factory.mktemp("llama_lora"), model, list(LLAMA_CONFIGS.values()),
                                    rm.stable_seed("llama_lora"))
    return model, base, adapters


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_adapters_merge_as_their_densified_fine_tunes(llama_family, tmp_path, backend):
    """Plain, rsLoRA, rank_pattern/alpha_pattern and embedding adapters through the command
    line, against PEFT's densification merged densely (both keep min(k, rank) triplets)."""
    model, base, adapters = llama_family
    out = tmp_path / "merged"
    cli("merge", base, *adapters, "-o", out, "--backend", backend, "--dtype", "float64", "--out-dtype", "float64")
    want, base64 = densified_merge(model, adapters, backend)
    assert update_error(rm.load_merged(out), want, base64) <= EXACT
    rep = json.loads((out / "tsvmerge_report.json").read_text())
    touches = [i.get("touches") for i in rep["inputs"]]
    assert touches[0] is None                                           # the base
    assert touches[1] == [f"model.layers.{l}.self_attn.{p}.weight" for l in (0, 1) for p in ("q_proj", "v_proj")]
    assert "model.embed_tokens.weight" in touches[4] and "model.norm.weight" not in touches[4]
    assert any("every other tensor is a zero task vector" in n for n in rep["inputs"][1]["notes"])


def test_patterns_follow_peft(llama_family):
    """rank_pattern and alpha_pattern as PEFT resolves them (its LoraLayer.scaling)."""
    model, base, adapters = llama_family
    task = LoraAdapter(adapters[2], tsvmerge.io.open_checkpoint(base))
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapters[2])
    for name, module in wrapped.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            ours = task.modules[name.removeprefix("base_model.model.") + ".weight"]
            assert (ours.rank, ours.scale) == (module.r["default"], module.scaling["default"]), name
            checked += 1
    assert checked == 6 and len({m.scale for m in task.modules.values()}) == 5  # 2, 4, 0.75, 11/6, 8/6


def test_single_adapter_is_peft_merge_and_unload(llama_family, tmp_path):
    """T = 1: the merged model is PEFT's merge_and_unload, and loads as the base does."""
    model, base, adapters = llama_family
    out = tmp_path / "one"
    cli("merge", base, adapters[1], "-o", out)
    merged, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    want = rm.merged_adapter(model, adapters[1], torch.float32)
    assert update_error(merged.state_dict(), want, model.state_dict()) <= 1e-6


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: tau = s (B A)^T, as for embeddings (wte)."""
    model = rm.gpt2()
    configs = [LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
               LoraConfig(r=4, lora_alpha=4, target_modules=["c_fc", "c_attn", "wte"], fan_in_fan_out=True)]
    base, adapters = rm.lora_family(tmp_path, model, configs, rm.stable_seed("gpt2"))
    out = tmp_path / "merged"
    cli("merge", base, *adapters, "-o", out, "--dtype", "float64", "--out-dtype", "float64", "--backend", "reference")
    want, base64 = densified_merge(model, adapters, "reference")
    assert update_error(rm.load_merged(out), want, base64) <= EXACT


def test_adapters_beside_dense_fine_tunes(llama_family, tmp_path):
    """Mixed inputs: two adapters and a full fine-tune (a model folder)."""
    model, base, adapters = llama_family
    full = rm.fine_tune(model.state_dict(), rm.stable_seed("full"), scale=0.05)
    folder = tmp_path / "full"
    ft = rm.llama()
    ft.load_state_dict(full)
    ft.save_pretrained(folder)
    out = tmp_path / "merged"
    cli("merge", base, adapters[0], folder, adapters[3], "-o", out, "--dtype", "float64", "--out-dtype", "float64",
        "--backend", "reference")
    base64 = {k: v.double() for k, v in model.state_dict().items()}
    tasks = [rm.merged_adapter(model, adapters[0]), {k: v.double() for k, v in full.items()},
             rm.merged_adapter(model, adapters[3])]
    want = tsvmerge.merge(base64, tasks, backend="reference", compute_dtype="float64", out_dtype="float64")
    assert update_error(rm.load_merged(out), want, base64) <= EXACT


def test_modules_to_save_and_trained_biases_are_read_whole(tmp_path):
    """modules_to_save (lm_head) and bias="all": the stored tensors are the fine-tune's values."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**rm.LLAMA, attention_bias=True))
    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]),
               LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], bias="all")]
    base, adapters = rm.lora_family(tmp_path, model, configs, rm.stable_seed("whole"))
    out = tmp_path / "merged"
    cli("merge", base, *adapters, "-o", out, "--dtype", "float64", "--out-dtype", "float64", "--backend", "reference")
    want, base64 = densified_merge(model, adapters, "reference")
    assert update_error(rm.load_merged(out), want, base64) <= EXACT
    assert (want["lm_head.weight"] - base64["lm_head.weight"]).norm() > 0                   # it did change
    assert (want["model.layers.1.self_attn.k_proj.bias"] - base64["model.layers.1.self_attn.k_proj.bias"]).norm() > 0


def test_spectral_path_never_forms_a_task_matrix(llama_family, monkeypatch):
    """Every matrix of an adapter merge comes from its factors: `read` (dense) is called only
    for tensors off the spectral path."""
    model, base, adapters = llama_family
    read = LoraAdapter.read

    def only_vectors(self, name):
        assert len(self.infos()[name].shape) < 2, f"{name} densified"
        return read(self, name)

    monkeypatch.setattr(LoraAdapter, "read", only_vectors)
    merged = tsvmerge.merge(base, adapters, backend="reference")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


# -- what is refused, with one line naming the adapter ------------------------------------------
def _edit(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("config,match", [
    (LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "use_dora=True: DoRA rescales"),
    (LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias=True"),
])
def test_variants_that_are_not_low_rank_are_refused(tmp_path, capsys, config, match):
    model = rm.llama()
    base, (adapter,) = rm.lora_family(tmp_path, model, [config], 1)
    capsys.readouterr()
    assert main(["merge", base, adapter, "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and adapter in err and "merge_and_unload" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_adapters_are_refused_naming_the_file(llama_family, tmp_path):
    model, base, adapters = llama_family
    other = tmp_path / "other"
    import shutil
    shutil.copytree(adapters[0], other)
    _edit(other, peft_type="IA3")
    with pytest.raises(InputError, match="is a PEFT IA3 adapter"):
        tsvmerge.merge(base, [str(other)])
    _edit(other, peft_type="LORA", r=5)
    with pytest.raises(InputError, match="has rank 4 but adapter_config.json gives module .*q_proj rank 5"):
        tsvmerge.merge(base, [str(other)])
    with pytest.raises(InputError, match="is a PEFT adapter, not a base model"):
        tsvmerge.merge(adapters[0], [base])
    gpt2_base = tmp_path / "gpt2"
    rm.gpt2().save_pretrained(gpt2_base)
    with pytest.raises(InputError, match="which the base .* does not have"):
        tsvmerge.merge(str(gpt2_base), [adapters[0]])


# -- a merged LoRA as a LoRA -------------------------------------------------------------------
def load_adapter(model, folder) -> dict:
    """PEFT loads the folder onto `model` and merges it in (fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    return wrapped.merge_and_unload().state_dict()


def test_merged_adapters_written_as_an_adapter(llama_family, tmp_path):
    model, base, adapters = llama_family
    out = tmp_path / "merged-lora"
    cli("merge", base, *adapters, "-o", out, "--output-format", "peft")
    dense = tsvmerge.merge(base, adapters)
    assert update_error(load_adapter(model, out), dense, model.state_dict()) <= FP32
    config = json.loads((out / "adapter_config.json").read_text())
    rep = json.loads((out / "tsvmerge_report.json").read_text())
    ranks = rep["adapter"]["ranks"]
    # rank <= sum of the adapters' ranks on each module: q_proj of layer 1 has 4 + 3 + 2 (rank_pattern)
    assert ranks["model.layers.1.self_attn.q_proj"] == 9 and ranks["model.layers.0.self_attn.q_proj"] == 11
    assert ranks["model.embed_tokens"] == 5 and "model.norm" not in ranks
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    for module, r in ranks.items():
        assert config["rank_pattern"].get(module, config["r"]) == r
    assert "assumed_linear" not in rep["adapter"]  # every layer type came from an input adapter


def test_gpt2_merged_adapter_keeps_conv1d_and_embedding_layouts(tmp_path):
    model = rm.gpt2()
    configs = [LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True),
               LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)]
    base, adapters = rm.lora_family(tmp_path, model, configs, rm.stable_seed("gpt2-out"))
    out = tmp_path / "merged-lora"
    cli("merge", base, *adapters, "-o", out, "--output-format", "peft")
    assert update_error(load_adapter(model, out), tsvmerge.merge(base, adapters), model.state_dict()) <= FP32


def test_what_cannot_be_a_lora_is_refused(llama_family, tmp_path, capsys):
    model, base, adapters = llama_family
    out = tmp_path / "out"
    assert main(["merge", base, *adapters, "-o", str(out), "--output-format", "peft", "--method", "task_arithmetic",
                 "--no-progress"]) == 2
    assert "method task_arithmetic makes no low-rank update" in capsys.readouterr().err
    folder = tmp_path / "full"
    ft = rm.llama()
    ft.load_state_dict(rm.fine_tune(model.state_dict(), 3))
    ft.save_pretrained(folder)
    assert main(["merge", base, adapters[0], str(folder), "-o", str(out), "--output-format", "peft",
                 "--no-progress"]) == 2
    assert "layernorm.weight changes, and it is not a matrix on the spectral path" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == ["full"]           # nothing written, no debris


def test_tsvc_file_exported_as_an_adapter(llama_family, tmp_path):
    """A TSV-C file of a LoRA fine-tune (only matrices changed) as a PEFT adapter; one of a full
    fine-tune is refused."""
    model, base, adapters = llama_family
    ft = rm.merged_adapter(model, adapters[1], torch.float32)
    tsvc = tmp_path / "ft.tsvc.safetensors"
    tsvmerge.compress(base, ft, rank=0.3, out=str(tsvc))
    out = tmp_path / "ft-lora"
    cli("decompress", base, tsvc, "-o", out, "--output-format", "peft")
    want = tsvmerge.decompress(base, str(tsvc))
    assert update_error(load_adapter(model, out), want, model.state_dict()) <= FP32
    full = tmp_path / "full.tsvc.safetensors"
    tsvmerge.compress(base, rm.fine_tune(model.state_dict(), 4), rank=0.3, out=str(full))
    with pytest.raises(ValueError, match="norm.weight changes"):
        tsvmerge.decompress(base, str(full), out=str(tmp_path / "no"), output_format="peft")
    assert not (tmp_path / "no").exists()


def test_base_saved_without_the_wrappers_prefix(llama_family, tmp_path):
    """Adapters trained on LlamaForCausalLM (`model.layers...`) on a base saved from the inner
    LlamaModel (`layers...`): read under the base's names, and the report says so."""
    model, base, adapters = llama_family
    inner = {k.removeprefix("model."): v for k, v in model.state_dict().items() if k.startswith("model.")}
    path = tmp_path / "inner.safetensors"
    tsvmerge.io.save_file(inner, str(path))
    rep = tsvmerge.merge(str(path), adapters[:2], out=str(tmp_path / "out"))
    got = rm.load_merged(tmp_path / "out")
    want = tsvmerge.merge(base, adapters[:2])
    # the two bases order their tensors differently, so their batches differ: equal up to fp32 rounding
    assert set(got) == set(inner) and max(float((got[k] - want["model." + k]).abs().max()) for k in got) <= 1e-6
    assert "names read under the base's: prefix 'model.' taken as ''" in rep["inputs"][1]["notes"]


def test_adapter_saved_as_bin(llama_family, tmp_path):
    """`save_pretrained(..., safe_serialization=False)` writes adapter_model.bin: read the same."""
    import shutil
    model, base, adapters = llama_family
    folder = tmp_path / "bin-adapter"
    shutil.copytree(adapters[3], folder)
    tensors = tsvmerge.io.load_file(str(folder / "adapter_model.safetensors"))
    os.remove(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    want = tsvmerge.merge(base, [adapters[0], adapters[3]], backend="reference")
    got = tsvmerge.merge(base, [adapters[0], str(folder)], backend="reference")
    assert all(torch.equal(got[k], want[k]) for k in want)
