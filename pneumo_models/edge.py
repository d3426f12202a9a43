"""Running the LiteRT flatbuffers of :mod:`pneumo_models.litert` on a device, or anywhere.

::

    from pneumo_models.edge import LiteRTModel        # pip install 'pneumo[edge]'
    edge = LiteRTModel("runs/cnn/export/litert/int8.tflite")
    probability = edge.predict(stored_uint8_images)   # [N, S, S, 1] -> [N]

The interpreter is ``ai_edge_litert`` (``tf.lite.Interpreter`` is deprecated in TF 2.21); no
TensorFlow is needed to run a flatbuffer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumo_data.common.errors import UserError
from pneumo_data.common.jobs import filtered_stderr


class LiteRTModel:
    """Runs an exported flatbuffer with ``ai_edge_litert``'s interpreter.

    Args:
      path: a ``.tflite`` written by :func:`export_litert`.
      num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserError("running LiteRT models needs ai-edge-litert: "
                            "pip install 'pneumo[edge]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"LiteRT model {self.path} does not exist")
        try:
            with filtered_stderr():  # its "Created ... XNNPACK delegate" line on every load
                self._interpreter = Interpreter(model_path=str(self.path),
                                                num_threads=num_threads)
        except ValueError as error:
            raise UserError(f"{self.path} is not a LiteRT flatbuffer ({error})") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = tuple(int(v) for v in self._input["shape"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1 \
                or self._input["dtype"] != np.uint8:
            raise UserError(f"{self.path} does not take uint8 [N, S, S, 1] images "
                            f"(input {self._input['dtype'].__name__} {list(shape)}); it was "
                            f"not written by pneumo_models.litert")
        self.stored_size = shape[1]
        self._batch = shape[0]
        with filtered_stderr():
            self._interpreter.allocate_tensors()

    def ops(self) -> list[str]:
        """The builtin op names in the flatbuffer."""
        return sorted({d["op_name"] for d in self._interpreter._get_ops_details()})

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self._interpreter.resize_tensor_input(
                self._input["index"], [batch, self.stored_size, self.stored_size, 1])
            with filtered_stderr():
                self._interpreter.allocate_tensors()
            self._batch = batch

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities float32 [N] for uint8 ``[N, S, S, 1]`` stored images."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != (self.stored_size,
                                                            self.stored_size, 1):
            raise ValueError(f"expected uint8 [N, {self.stored_size}, {self.stored_size}, 1], "
                             f"got {images.dtype} {images.shape}")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start:start + batch_size])
            self._resize(len(chunk))
            self._interpreter.set_tensor(self._input["index"], chunk)
            self._interpreter.invoke()
            out.append(np.array(self._interpreter.get_tensor(self._output["index"])).reshape(-1))
        return np.concatenate(out) if out else np.zeros([0], np.float32)
