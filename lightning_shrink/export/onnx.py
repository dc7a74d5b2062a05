"""The ONNX format: ``model.onnx`` for ONNX Runtime on CPU, with integer arithmetic where the model
is quantized.

The float graph is traced with ``torch.onnx.export`` (the TorchScript exporter: the dynamo one
needs ``onnxscript``), from a stand-in of :func:`lightning_shrink.convert`'s model whose int8
layers are float layers holding the dequantized weights; then every quantized layer's weight is
replaced, with the ``onnx`` package, by its int8 values and scales:

* int8 ``Linear`` with dynamic activations: the input's per-tensor range, scale and zero point
  computed in the graph exactly as the int8 kernel does (affine 7-bit, ``scale = (max - min) /
  127`` with 0 in the range), ``QuantizeLinear`` to uint8, ``MatMulInteger`` with the int8 weight
  (transposed, ``(in, out)``), and one ``Mul`` by ``input_scale * weight_scale``; one quantization
  per input tensor (the query, key and value projections share theirs);
* static activations: the observed scale and zero point as constants (the input is clipped to
  the 7-bit range first, as the kernel does);
* int4 and weight-only layers: the int8 values and scales stored, dequantized in the graph
  (ONNX Runtime folds that into a float weight when the session starts: the file is small, the
  arithmetic float), the activations fake-quantized (``QuantizeLinear``/``DequantizeLinear``)
  where the layer quantizes them;
* int8 embedding tables: a ``Gather`` of int8 rows and of their scales.

Zeros of pruned weights stay zeros (int8 zero is exact). Inputs ``input_ids`` and
``attention_mask`` (and ``token_type_ids`` where the model takes them) have dynamic ``batch`` and
``sequence`` axes; the output is ``logits``.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_shrink.export.hf import HF_FORMAT_VERSION
from lightning_shrink.export.layout import ONNX_FORMAT, ONNX_NAME, TRANSFORMERS_CONFIG_NAME

__all__ = ["OPSET", "write_onnx"]

#: The ONNX opset of the exported graph.
OPSET = 17
_QMAX = 127.0
_SMALL_SCALE = 6.1e-5  # the int8 kernel's smallest activation scale


def _missing_extra(exc: ImportError) -> ImportError:
    return ImportError(f'the ONNX export needs onnx ({exc}): pip install "lightning-shrink[onnx]"')


class _Logits(nn.Module):
    """``model(**inputs).logits`` with positional inputs, for tracing."""

    def __init__(self, model: nn.Module, names: list[str], use_cache: bool) -> None:
        super().__init__()
        self.model, self.names, self.use_cache = model, names, use_cache

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.names, inputs, strict=True))
        if self.use_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def _stand_in(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A float copy of ``model`` whose int8 layers are float layers with the dequantized weights,
    and the int8 layers by qualified name."""
    from lightning_shrink.export.hf import _int8_layers
    from lightning_shrink.quantization.hooks import _set_submodule
    from lightning_shrink.quantization.int8_layers import Int8Embedding, Int8Linear

    layers = _int8_layers(model)
    float_model = copy.deepcopy(model).eval()
    for name, layer in layers.items():
        if isinstance(layer, Int8Linear):
            new: nn.Module = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
            new.weight.data = layer.dequantized_weight().clone()
            if layer.bias is not None:
                new.bias.data = layer.bias.detach().float().clone()
        elif isinstance(layer, Int8Embedding):
            new = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
            new.weight.data = layer(torch.arange(layer.num_embeddings)).detach().clone()
        else:
            raise ValueError(
                f"export: the quantized layer {name!r} ({type(layer).__name__}) has no ONNX form here "
                '(Linear and Embedding layers only); use format="native"'
            )
        _set_submodule(float_model, name, new)
    return float_model, layers


def _input_names(model: nn.Module) -> list[str]:
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


class _Graph:
    """Helpers to add nodes and initializers to an ONNX graph with fresh names."""

    def __init__(self, graph: Any) -> None:
        from onnx import helper, numpy_helper

        self.graph, self.helper, self.numpy_helper = graph, helper, numpy_helper
        self.count = 0
        self.new_nodes: list[Any] = []

    def name(self, base: str) -> str:
        self.count += 1
        return f"shrink/{base}_{self.count}"

    def const(self, base: str, value: torch.Tensor) -> str:
        name = self.name(base)
        self.graph.initializer.append(self.numpy_helper.from_array(value.detach().cpu().numpy(), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, output: str | None = None, **attrs: Any) -> str:
        out = output or self.name(base)
        self.new_nodes.append(self.helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


def _quantize_input(g: _Graph, x: str, layer: nn.Module, cache: dict[Any, tuple[str, str, str]]) -> tuple:
    """``(x_q uint8, scale, zero_point)`` of ``x`` as ``layer`` quantizes its input (cached)."""
    key = (x, layer.activations) if layer.activations == "dynamic" else (x, id(layer))
    if key in cache:
        return cache[key]
    if layer.activations == "dynamic":
        zero = g.const("zero", torch.tensor(0.0))
        lo = g.node("Min", [g.node("ReduceMin", [x], "min", keepdims=0), zero], "lo")
        hi = g.node("Max", [g.node("ReduceMax", [x], "max", keepdims=0), zero], "hi")
        scale = g.node("Div", [g.node("Sub", [hi, lo], "range"), g.const("qmax", torch.tensor(_QMAX))], "s")
        scale = g.node("Max", [scale, g.const("small", torch.tensor(_SMALL_SCALE))], "scale")
        zp = g.node("Round", [g.node("Div", [g.node("Neg", [lo], "nlo"), scale], "zpf")], "zpr")
        zp = g.node("Clip", [zp, zero, g.const("qmax", torch.tensor(_QMAX))], "zpc")
        zp = g.node("Cast", [zp], "zp", to=2)  # uint8
        xin = x
    else:
        s, z = float(layer.input_scale), int(layer.input_zero_point)
        scale = g.const("input_scale", torch.tensor(s))
        zp = g.const("input_zero_point", torch.tensor(z, dtype=torch.uint8))
        low, high = g.const("low", torch.tensor(-z * s)), g.const("high", torch.tensor((_QMAX - z) * s))
        xin = g.node("Clip", [x, low, high], "xclip")
    xq = g.node("QuantizeLinear", [xin, scale, zp], "xq")
    cache[key] = (xq, scale, zp)
    return cache[key]


def _dequantized_weight(g: _Graph, layer: nn.Module) -> str:
    """A float ``(out, in)`` weight computed in the graph from the int8 values and scales."""
    q = g.const("weight_q", layer.weight)
    wf = g.node("Cast", [q], "weight_f", to=1)
    if layer.group_size is None:
        return g.node("Mul", [wf, g.const("weight_scale", layer.weight_scale.reshape(-1, 1).float())], "w")
    rows, cols = layer.weight.shape
    shape = g.const("shape", torch.tensor([rows, cols // layer.group_size, layer.group_size]))
    grouped = g.node("Reshape", [wf, shape], "grouped")
    scaled = g.node("Mul", [grouped, g.const("weight_scale", layer.weight_scale.float().unsqueeze(-1))], "gw")
    return g.node("Reshape", [scaled, g.const("shape", torch.tensor([rows, cols]))], "w")


def _rewrite(model_proto: Any, layers: dict[str, nn.Module], prefix: str) -> None:
    from lightning_shrink.quantization.int8_layers import Int8Embedding

    g = _Graph(model_proto.graph)
    graph = model_proto.graph
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    by_init = {f"{prefix}{name}.weight": layer for name, layer in layers.items()}
    removed: set[int] = set()
    cache: dict[Any, tuple[str, str, str]] = {}

    def uses(name: str) -> list[Any]:
        out = []
        for node in consumers.get(name, []):
            if node.op_type == "Identity":
                out += uses(node.output[0])
            else:
                out.append(node)
        return out

    for init_name, layer in by_init.items():
        for node in uses(init_name):
            if id(node) in removed:
                continue
            if isinstance(layer, Int8Embedding):
                if node.op_type != "Gather" or node.input[0] == node.input[1]:
                    raise ValueError(
                        f"export: embedding table {init_name!r} is used by a {node.op_type} node"
                    )
                if layer.group_size is None:
                    rows = g.node("Gather", [g.const("table_q", layer.weight), node.input[1]], "rows_q")
                    scales = g.node(
                        "Gather",
                        [g.const("table_scale", layer.weight_scale.reshape(-1, 1).float()), node.input[1]],
                        "row_scale",
                    )
                    g.node(
                        "Mul", [g.node("Cast", [rows], "rows_f", to=1), scales], "rows", output=node.output[0]
                    )
                else:
                    g.node(
                        "Gather",
                        [_dequantized_weight(g, layer), node.input[1]],
                        "rows",
                        output=node.output[0],
                    )
                removed.add(id(node))
                continue
            integer = layer.weight_bits == 8 and layer.activations is not None
            if node.op_type == "Transpose":
                matmuls = [
                    m
                    for m in consumers[node.output[0]]
                    if m.op_type == "MatMul" and m.input[1] == node.output[0]
                ]
                if len(matmuls) != len(consumers[node.output[0]]) or not matmuls:
                    raise ValueError(
                        f"export: weight {init_name!r} is transposed into something else than a MatMul"
                    )
                for matmul in matmuls:
                    _linear(g, matmul.input[0], matmul.output[0], None, layer, integer, cache)
                    removed.add(id(matmul))
                removed.add(id(node))
            elif node.op_type == "Gemm":
                attrs = {a.name: a for a in node.attribute}
                if (
                    "transB" not in attrs
                    or attrs["transB"].i != 1
                    or ("transA" in attrs and attrs["transA"].i)
                ):
                    raise ValueError(f"export: weight {init_name!r} is used by an unexpected Gemm")
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                _linear(g, node.input[0], node.output[0], bias, layer, integer, cache)
                removed.add(id(node))
            else:
                raise ValueError(f"export: weight {init_name!r} is used by a {node.op_type} node")
    # Insert the new nodes where they are needed: a topological order is required, so rebuild it.
    kept = [n for n in graph.node if id(n) not in removed] + g.new_nodes
    del graph.node[:]
    graph.node.extend(_topological(kept, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _linear(
    g: _Graph, x: str, y: str, bias: str | None, layer: nn.Module, integer: bool, cache: dict[Any, Any]
) -> None:
    """``y = x @ W.T (+ bias)`` for the quantized ``layer``, in integer arithmetic when ``integer``."""
    out = g.name("linear") if bias else y
    if integer:
        xq, scale, zp = _quantize_input(g, x, layer, cache)
        wt = g.const("weight_t", layer.weight.t().contiguous())
        acc = g.node("Cast", [g.node("MatMulInteger", [xq, wt, zp], "acc")], "acc_f", to=1)
        factor = g.node("Mul", [scale, g.const("weight_scale", layer.weight_scale.float())], "factor")
        g.node("Mul", [acc, factor], "y", output=out)
    else:
        xin = x
        if layer.activations is not None:
            # Fake quantization as the layer computes it: multiply by the reciprocal scale (not
            # QuantizeLinear's division), round half to even, clamp, rescale.
            _, scale, zp = _quantize_input(g, x, layer, cache)
            zpf = g.node("Cast", [zp], "zp_f", to=1)
            inv = g.node("Reciprocal", [scale], "inv")
            q = g.node("Round", [g.node("Add", [g.node("Mul", [x, inv], "xs"), zpf], "xz")], "xr")
            q = g.node(
                "Clip", [q, g.const("zero", torch.tensor(0.0)), g.const("qmax", torch.tensor(_QMAX))], "xc"
            )
            xin = g.node("Mul", [g.node("Sub", [q, zpf], "xq0"), scale], "xdq")
        w = g.node("Transpose", [_dequantized_weight(g, layer)], "wt", perm=[1, 0])
        g.node("MatMul", [xin, w], "y", output=out)
    if bias:
        g.node("Add", [out, bias], "y", output=y)


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    ready = set(available) | {""}
    pending, order = list(nodes), []
    while pending:
        progress = []
        rest = []
        for node in pending:
            (progress if all(i in ready for i in node.input) else rest).append(node)
        if not progress:
            raise ValueError("export: the rewritten ONNX graph has a cycle or a missing input")
        for node in progress:
            ready.update(node.output)
        order += progress
        pending = rest
    return order


def write_onnx(model: nn.Module, directory: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model`` (a transformers ``PreTrainedModel``) as ``model.onnx`` into the empty
    ``directory``, with ``config.json`` and ``tokenizer``'s files.

    Returns:
        The ``shrink_config.json`` content for the caller to write last.
    """
    try:
        import onnx
    except ImportError as exc:
        raise _missing_extra(exc) from exc
    float_model, layers = _stand_in(model)
    if hasattr(float_model.config, "_attn_implementation"):
        float_model.config._attn_implementation = "eager"  # traceable attention
    names = _input_names(float_model)
    use_cache = "use_cache" in inspect.signature(float_model.forward).parameters
    wrapper = _Logits(float_model, names, use_cache).eval()
    fill = {"input_ids": 2, "attention_mask": 1, "token_type_ids": 0}
    example = tuple(torch.full((2, 8), fill[n], dtype=torch.long) for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch", 1: "sequence"} if use_cache else {0: "batch"}
    path = directory / ONNX_NAME
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=False,
        )
    proto = onnx.load(str(path))
    _rewrite(proto, layers, "model.")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    config = model.config.to_dict()
    config.pop("auto_map", None)
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (directory / TRANSFORMERS_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {
        "format": ONNX_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "architecture": {"kind": "transformers", "class": type(model).__name__},
        "onnx": {"file": ONNX_NAME, "opset": OPSET, "inputs": names, "outputs": ["logits"]},
    }
