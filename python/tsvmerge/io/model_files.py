"""The files besides the weights that make a folder a loadable model, carried from the base.

When the base is a model folder, the merged (or decompressed) folder gets the base's
configuration, generation, processor and tokenizer files, chat templates, open_clip's
config and custom model code, so `from_pretrained` works on it as it does on the base.
The rule: top-level entries of the base folder whose names match `CARRIED`, that are regular
files or links to them (a Hugging Face cache links every file to a blob; the content is
copied). Never the weights, an index, a sub-folder, or anything else (README, licence,
training state): the merged model is not the base, so its card and logs are not carried.
"""
from __future__ import annotations

import fnmatch
import os
import shutil

CARRIED = (
    "config.json", "generation_config.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "*.tiktoken", "chat_template.json", "chat_template.jinja",
    "open_clip_config.json",
    "configuration_*.py", "modeling_*.py", "tokenization_*.py", "processing_*.py", "image_processing_*.py",
)


def model_files(folder: str) -> list[str]:
    """Names of the files `carry_model_files` copies from `folder`, sorted."""
    return sorted(name for name in os.listdir(folder)
                  if any(fnmatch.fnmatchcase(name, p) for p in CARRIED) and os.path.isfile(os.path.join(folder, name)))


def carry_model_files(base, folder: str) -> list[str]:
    """Copy the base folder's model files into `folder` (the output being written); returns
    their names. A base that is not a folder carries nothing."""
    if not isinstance(base, (str, os.PathLike)) or not os.path.isdir(base):
        return []
    names = model_files(os.fspath(base))
    for name in names:
        shutil.copyfile(os.path.join(base, name), os.path.join(folder, name))
    return names
