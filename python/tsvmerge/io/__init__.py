"""Input and output: lazy readers, streamed safetensors, atomic outputs."""
from .checkpoint import Checkpoint, CompressedTask, open_checkpoint, TSVC_FORMAT
from .errors import InputError
from .output import ShardedWriter, atomic_file, atomic_folder
from .safetensors import SafetensorsWriter, TensorInfo, load_file, save_file

__all__ = ["Checkpoint", "CompressedTask", "InputError", "SafetensorsWriter", "ShardedWriter", "TSVC_FORMAT", "TensorInfo",
           "atomic_file", "atomic_folder", "load_file", "open_checkpoint", "save_file"]
