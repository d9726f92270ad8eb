"""Input and output: lazy readers, streamed safetensors, outputs published whole."""
from .checkpoint import Checkpoint, open_checkpoint
from .errors import InputError
from .output import ShardedWriter, file_writer, model_writer, model_writers, save_json, write_json
from .publish import Output, OutputError, claim, input_paths, publishing
from .safetensors import SafetensorsWriter, TensorInfo, load_file, save_file
from .tsvc_file import CompressedTask

__all__ = ["Checkpoint", "CompressedTask", "InputError", "Output", "OutputError", "SafetensorsWriter", "ShardedWriter",
           "TensorInfo", "claim", "file_writer", "input_paths", "load_file", "model_writer", "model_writers",
           "open_checkpoint", "publishing", "save_file", "save_json", "write_json"]
