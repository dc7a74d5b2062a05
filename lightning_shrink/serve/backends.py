"""The two runtimes behind the endpoint, with one interface: class logits of a padded batch, and
greedy generation from left-padded prompts.

:class:`TorchBackend` runs the model of :func:`lightning_shrink.load` (the int8 layers of a converted
export); :class:`OnnxBackend` runs ``model.onnx`` on ONNX Runtime's CPU provider. Which one serves a
directory is decided by :func:`~lightning_shrink.serve.model_info.choose_backend`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lightning_shrink.serve.model_info import ONNX_NAME, ModelInfo

__all__ = ["Backend", "OnnxBackend", "TorchBackend", "make_backend"]


class Backend(Protocol):
    """What the endpoint asks of a runtime."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Float logits ``(batch, classes)`` of right-padded int64 ``input_ids``."""
        ...

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedily generated ids ``(batch, <= max_new_tokens)`` after left-padded prompts (fewer
        columns when every row has ended with an end-of-sequence token)."""
        ...


class TorchBackend:
    """The PyTorch model of :func:`lightning_shrink.load` (in eval mode, without gradients)."""

    def __init__(self, directory: Path, info: ModelInfo, threads: int) -> None:
        import lightning_shrink

        torch.set_num_threads(threads)
        self.info = info
        self.model = lightning_shrink.load(directory)

    @torch.inference_mode()
    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.model(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)
        )
        return out.logits.float().numpy()

    @torch.inference_mode()
    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        prompt = torch.from_numpy(input_ids)
        out = self.model.generate(
            input_ids=prompt,
            attention_mask=torch.from_numpy(attention_mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.info.pad_token_id,
        )
        return out[:, prompt.shape[1] :].numpy()


class OnnxBackend:
    """``model.onnx`` on ONNX Runtime's CPU execution provider (``threads`` intra-op threads that
    sleep between runs rather than spin).

    The graph's inputs are fed by name: ``input_ids`` (required), ``attention_mask``,
    ``token_type_ids`` (zeros) and ``position_ids`` (counted over the unmasked tokens); its first
    output is the logits. Generation reruns the whole sequence at each step (no KV cache).
    """

    _KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

    def __init__(self, directory: Path, info: ModelInfo, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(
                'serving model.onnx needs ONNX Runtime: pip install "lightning-shrink[onnx]"'
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's threads spin after each run by default, holding the cores that the HTTP
        # server process needs for the next requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.info = info
        self.session = ort.InferenceSession(
            str(directory / ONNX_NAME), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        unknown = [name for name in self.inputs if name not in self._KNOWN_INPUTS]
        if "input_ids" not in self.inputs or unknown:
            raise ValueError(
                f"serve: {str(directory / ONNX_NAME)!r} takes inputs {self.inputs}; the endpoint feeds "
                f"{list(self._KNOWN_INPUTS)} (input_ids required)"
            )

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        feed = {k: v.astype(np.int64) for k, v in feed.items() if k in self.inputs}
        return np.asarray(self.session.run(None, feed)[0])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run(input_ids, attention_mask).astype(np.float32)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        ids, mask = input_ids, attention_mask
        new = []
        eos = np.asarray(self.info.eos_token_ids, dtype=np.int64)
        ended = np.zeros(len(ids), dtype=bool)
        for _ in range(max_new_tokens):
            nxt = self._run(ids, mask)[:, -1, :].argmax(axis=-1).astype(np.int64)
            new.append(nxt)
            ended = ended | np.isin(nxt, eos)
            if ended.all():
                break
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(nxt)[:, None]], axis=1)
        return np.stack(new, axis=1)


def make_backend(directory: str | os.PathLike[str], backend: str, info: ModelInfo, threads: int) -> Any:
    """The runtime named by ``backend`` (``"torch"`` or ``"onnx"``, as chosen by ``choose_backend``)."""
    kind = {"torch": TorchBackend, "onnx": OnnxBackend}[backend]
    return kind(Path(directory), info, threads)
