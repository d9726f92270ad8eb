"""Input and output: lazy readers, streamed safetensors, atomic outputs."""
from .checkpoint import Checkpoint, open_checkpoint
from .errors import InputError
from .output import ShardedWriter, atomic_file, atomic_folder, file_writer, model_writer
from .safetensors import SafetensorsWriter, TensorInfo, load_file, save_file
from .tsvc_file import CompressedTask

__all__ = ["Checkpoint", "CompressedTask", "InputError", "SafetensorsWriter", "ShardedWriter", "TensorInfo",
           "atomic_file", "atomic_folder", "file_writer", "load_file", "model_writer", "open_checkpoint", "save_file"]
