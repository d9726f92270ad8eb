"""Tiny real models for the tests, built offline: Hugging Face CLIP (transformers), open_clip
CLIP, and the task-vectors `ImageEncoder` whose pickles are the TSV paper's checkpoints.

Fine-tunes are the base plus a dense random perturbation of every floating tensor, saved the
ways people save them. Importing this module imports neither transformers nor open_clip:
each builder imports what it needs (the tests skip where a package is missing).
"""
import json
import os
import zlib

import torch

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

# open_clip model config: a ViT-B-32-shaped CLIP shrunk (width 32, 2 blocks per tower); the
# vocabulary is open_clip's own tokenizer's, so get_tokenizer works on it.
OPEN_CLIP_NAME = "tsvmerge-tiny-ViT"
OPEN_CLIP_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_clip_configs",
                                     OPEN_CLIP_NAME + ".json")
HF_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                 patch_size=10, projection_dim=24)
HF_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=60,
               max_position_embeddings=16, projection_dim=24, bos_token_id=52, eos_token_id=53, pad_token_id=53)


def stable_seed(text: str) -> int:
    return zlib.crc32(text.encode()) % 2**31


def fine_tune(state: dict, seed: int, scale: float = 0.02) -> dict:
    """`state` moved by a dense random perturbation of every floating tensor (buffers kept)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def max_relative_error(got: dict, want: dict) -> float:
    """max over tensors of ||got - want|| / ||want||; the names must be the same."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    return max(float((got[k].double() - want[k].double()).norm() / max(want[k].double().norm(), 1e-30))
               for k in want)


def load_merged(folder) -> dict:
    """Every tensor of a model folder that tsvmerge wrote."""
    from tsvmerge.io import open_checkpoint
    ckpt = open_checkpoint(str(folder))
    return {name: ckpt.read(name) for name in ckpt.infos()}


# -- Hugging Face CLIP ------------------------------------------------------------------------
def hf_clip(vision_only: bool = False):
    import transformers
    torch.manual_seed(0)
    if vision_only:
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION))
    config = transformers.CLIPConfig(text_config=HF_TEXT, vision_config=HF_VISION, projection_dim=24)
    return transformers.CLIPModel(config)


def hf_processor():
    """A CLIPProcessor with a 28-letter BPE vocabulary, written by transformers itself."""
    import tempfile
    import transformers
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = transformers.CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
    image = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size=30)
    return transformers.CLIPProcessor(image_processor=image, tokenizer=tokenizer)


def hf_clip_family(folder, tasks: int, seed: int, vision_only: bool = False, names=None) -> tuple:
    """A base folder (model, processor and tokenizer, via save_pretrained) and `tasks`
    fine-tuned model folders, named `names` (default base, ft0, ft1, ...); returns
    (base path, [task paths], base model)."""
    names = names or ["base"] + [f"ft{t}" for t in range(tasks)]
    model = hf_clip(vision_only)
    base = os.path.join(folder, names[0])
    model.save_pretrained(base)
    hf_processor().save_pretrained(base)
    paths = []
    for t in range(tasks):
        ft = hf_clip(vision_only)
        ft.load_state_dict(fine_tune(model.state_dict(), seed + t))
        paths.append(os.path.join(folder, names[1 + t]))
        ft.save_pretrained(paths[-1])
    return base, paths, model


# -- open_clip --------------------------------------------------------------------------------
def open_clip():
    """open_clip, with the tiny config registered under OPEN_CLIP_NAME."""
    import open_clip as oc
    if OPEN_CLIP_NAME not in oc.list_models():
        oc.add_model_config(OPEN_CLIP_CONFIG_FILE)
    return oc


def open_clip_model(name: str = OPEN_CLIP_NAME):
    torch.manual_seed(0)
    return open_clip().create_model(name)


class ImageEncoder(torch.nn.Module):
    """The task-vectors repository's ImageEncoder: an open_clip model under `self.model`,
    with the text transformer deleted; its pickles are the TSV paper's checkpoints."""

    def __init__(self, name: str = OPEN_CLIP_NAME):
        super().__init__()
        self.model = open_clip_model(name)
        delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


# -- PEFT LoRA adapters on a tiny Llama (and a GPT-2, whose Conv1D weights are [in, out]) --------
LLAMA = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=60, max_position_embeddings=32)
GPT2 = dict(n_embd=48, n_layer=2, n_head=4, vocab_size=60, n_positions=32, bos_token_id=0, eos_token_id=0)
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(dtype=torch.float32):
    import transformers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype)


def gpt2(dtype=torch.float32):
    import transformers
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).to(dtype)


def trained_adapter(model, config, seed: int, folder) -> str:
    """`config` (a peft.LoraConfig) on a copy of `model`, its LoRA factors set to random values of
    a trained adapter's size (PEFT starts B at zero), saved with save_pretrained; returns the folder."""
    import copy
    import warnings
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and saving embedding layers
        wrapped = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
        gen = torch.Generator().manual_seed(seed)
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.3
            elif p.requires_grad:  # modules_to_save, trained biases: move them like a fine-tune
                p.data += 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        wrapped.save_pretrained(folder)
    return str(folder)


def merged_adapter(model, folder, dtype=torch.float64) -> dict:
    """PEFT's own densified fine-tune: the adapter loaded onto `model` and merge_and_unload()ed, in `dtype`."""
    import copy
    import warnings
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model).to(dtype), folder)
        wrapped = wrapped.to(dtype)
        return {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}


def lora_family(folder, model, configs: list, seed: int) -> tuple:
    """The base folder (save_pretrained) and one trained adapter folder per LoraConfig in
    `configs`: (base path, [adapter paths])."""
    base = os.path.join(folder, "base")
    model.save_pretrained(base)
    return base, [trained_adapter(model, c, seed + i, os.path.join(folder, f"adapter{i}")) for i, c in enumerate(configs)]
