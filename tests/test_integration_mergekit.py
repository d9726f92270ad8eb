"""tsvmerge as mergekit's `tsv` method: mergekit's own YAML runner and its state-dict API."""
import os

import pytest
import torch

pytest.importorskip("mergekit", reason="install tsvmerge[mergekit] (the [test] extra includes it)")
transformers = pytest.importorskip("transformers")

import tsvmerge  # noqa: E402
from tsvmerge.integrations import mergekit as tsv_mergekit  # noqa: E402

from conftest import ODD_SHAPES, random_zoo  # noqa: E402
from tiny_models import run_tool, save_family  # noqa: E402

T = 3


def tiny_llama(folder, seed):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return save_family(transformers.LlamaForCausalLM, config, folder, T, seed)


def load(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).state_dict()


def write_config(path, base, tasks, *, models_extra=None, parameters=""):
    lines = ["merge_method: tsv", f"base_model: {base}", "dtype: float32", "models:"]
    for i, task in enumerate(tasks):
        lines.append(f"  - model: {task}")
        lines += ["    " + line for line in (models_extra or {}).get(i, "").splitlines()]
    lines += parameters.splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_mergekit_yaml_equals_tsvmerge_merge(tmp_path, seed):
    base, tasks = tiny_llama(str(tmp_path), seed)
    config = tmp_path / "tsv.yml"
    write_config(config, base, tasks)
    run_tool(["tsvmerge-mergekit", str(config), str(tmp_path / "out"), "--no-copy-tokenizer"], cwd=tmp_path)

    out = load(tmp_path / "out")
    base_sd = load(base)
    ref = tsvmerge.merge(base_sd, [load(t) for t in tasks], progress=False)
    assert out.keys() == ref.keys()
    for name in ref:
        assert not torch.equal(ref[name], base_sd[name]), name    # every tensor moved
        torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=0, msg=name)


def test_mergekit_yaml_weights_and_filters(tmp_path, seed):
    """Per-model `weight` (with a filter) scales task vectors; a `spectral: false` filter takes
    the embeddings off the spectral path; `backend: reference` is the exact path."""
    base, tasks = tiny_llama(str(tmp_path), seed)
    config = tmp_path / "tsv.yml"
    weight = "parameters:\n  weight:\n    - filter: mlp\n      value: 0.5\n    - value: 1.0"
    write_config(config, base, tasks, models_extra={0: weight},
                 parameters="parameters:\n  backend: reference\n  alpha: 0.8\n"
                            "  spectral:\n    - filter: embed_tokens\n      value: false\n    - value: true")
    run_tool(["tsvmerge-mergekit", str(config), str(tmp_path / "out"), "--no-copy-tokenizer"], cwd=tmp_path)

    base_sd, finetuned = load(base), [load(t) for t in tasks]
    finetuned[0] = {n: (b.double() + 0.5 * (finetuned[0][n].double() - b.double())).float() if "mlp" in n
                    else finetuned[0][n] for n, b in base_sd.items()}
    ref = tsvmerge.merge(base_sd, finetuned, backend="reference", alpha=0.8, exclude=["embed_tokens"], progress=False)
    plain = tsvmerge.merge(base_sd, [load(t) for t in tasks], backend="reference", alpha=0.8, progress=False)
    out = load(tmp_path / "out")
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=0, msg=name)
    emb, mlp = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
    assert (out[emb] - plain[emb]).abs().max() > 1e-3      # the filters changed these tensors
    assert (out[mlp] - plain[mlp]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_dicts_batches_layers(seed, dtype):
    """mergekit's batched path hands the kernel same-shaped weights stacked across layers."""
    from mergekit.merge_methods import get, merge_state_dicts
    tsv_mergekit.register()
    tsv_mergekit.register()                               # a second call is harmless
    assert get("tsv").spec.name == "tsv"
    base, finetuned = random_zoo(seed, T, ODD_SHAPES, dtype)
    stacks = []
    kernel = tsv_mergekit.merge_stack

    def spy(base_stack, *args, **kwargs):
        stacks.append(tuple(base_stack.shape))
        return kernel(base_stack, *args, **kwargs)

    tsv_mergekit.merge_stack = spy
    try:
        out = merge_state_dicts({"base": base, **{f"ft{i}": sd for i, sd in enumerate(finetuned)}}, "tsv",
                                base="base", parameters={"backend": "torch"})
    finally:
        tsv_mergekit.merge_stack = kernel
    ref = tsvmerge.merge(base, finetuned, backend="torch", progress=False)
    assert (2, 37, 23) in stacks and (2, 64, 48) in stacks   # two layers in one call
    for name in ref:
        assert out[name].dtype == base[name].dtype
        torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=0, msg=name)


def test_tsvmerge_mergekit_help_lists_mergekit_options():
    proc = run_tool(["tsvmerge-mergekit", "--help"], cwd=os.getcwd())
    assert "--copy-tokenizer" in proc.stdout and "CONFIG_FILE" in proc.stdout


def test_energy_target_options_reach_the_backend(seed):
    """energy_target and max_passes in a config's parameters reach the torch backend's checks."""
    from mergekit.merge_methods import merge_state_dicts
    tsv_mergekit.register()
    base, finetuned = random_zoo(seed, T, ODD_SHAPES)
    models = {"base": base, **{f"ft{i}": sd for i, sd in enumerate(finetuned)}}
    with pytest.raises(ValueError, match="max_passes"):
        merge_state_dicts(models, "tsv", base="base", parameters={"backend": "torch", "max_passes": 2})
    with pytest.raises(ValueError, match="energy_target"):
        merge_state_dicts(models, "tsv", base="base", parameters={"backend": "torch", "energy_target": 1.5})
