"""A network as it is deployed: its ONNX graph (made one way, for `export` and for latency timing alike), checked
against PyTorch, and an ONNX Runtime session over it.

Timing the graph rather than eager PyTorch matters: at batch 1 eager PyTorch mostly times its per-operator
dispatch (a 1,888-parameter separable net read 1.1 ms eager, 0.042 ms in ONNX Runtime; see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings

import numpy as np
import torch
from torch import nn

from kdsearch import KdsearchError, first_line

# The graph's outputs must match PyTorch's within this, elementwise, on a random batch (`np.allclose`'s rule)
ATOL, RTOL = 1e-4, 1e-3
# Held while exporting, and by whatever else in this process calls torch functions that touch torch.fx's
# process-wide tracing state (`torch.manual_seed` does, through torch._disable_dynamo): an export beside a seeding in
# another thread failed with KeyError: 'custom' here. Also keeps the registry cache below to one export at a time.
TORCH_GLOBALS = threading.RLock()


class Deployable(nn.Module):
    """A network with its input normalisation folded in: it takes float images with pixel values 0..255."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def to_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model's ONNX graph (a dynamic batch dimension), as bytes. Raises the exporter's own error.

    kdsearch's own families and TorchScript go through torch.onnx's tracing exporter, any other network through
    its torch.export-based one: tracing records one run of the forward, so it would silently keep one branch of a
    user's data-dependent Python, which torch.export refuses; kdsearch's forwards have none that tracing takes. The
    tracing exporter takes 0.015 s for a small convnet against 0.42 s (1.8 s the first time), and the search exports
    every new architecture before timing it."""
    batch = ({0: torch.export.Dim("batch")},)  # by position: a forward's argument may have any name
    # stderr caught: where the export fails, torch prints the partial graph and hundreds of warnings there; the
    # one-line error says what matters
    with TORCH_GLOBALS, _registry_built_once(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, torch.jit.ScriptModule) or _built_in(model):
            return _traced_to_onnx(model, example)
        program = torch.onnx.export(model, (example,), None, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=batch, verbose=False)
    return program.model_proto.SerializeToString()


def _built_in(model: nn.Module) -> bool:
    """Whether the network (inside its `Deployable`) is one of kdsearch's families."""
    from kdsearch.models import ConvNet, ResNet, SeparableNet

    network = model.model if isinstance(model, Deployable) else model
    return type(network) in (ConvNet, ResNet, SeparableNet)  # not a user's subclass, whose forward may branch


def _traced_to_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """torch.onnx's TorchScript-based exporter (deprecated, still in torch 2.14): it traces a module or reads
    TorchScript."""
    out = io.BytesIO()
    torch.onnx.export(model, (example,), out, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return out.getvalue()


_REGISTRY: dict = {}


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx rebuilds its operator registry from onnxscript's sources on every export (0.5 s of each 1.0 s
    export of a small student here); build it once per opset. Nothing changes where torch's internals differ."""
    try:
        from torch.onnx._internal.exporter import _registration
        built = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return

    def from_torchlib(*args, opset_version=None, **kwargs):
        key = (opset_version, *args[1:], *sorted(kwargs.items()))  # args[0]: the class, when called on one
        if key not in _REGISTRY:
            _REGISTRY[key] = built.__get__(None, _registration.ONNXRegistry)(opset_version=opset_version, **kwargs)
        return _REGISTRY[key]

    _registration.ONNXRegistry.from_torchlib = from_torchlib
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = built


def session(graph: bytes, threads: int, device: str = "cpu"):
    """An ONNX Runtime session over `graph` with `threads` intra- and inter-op threads, all graph optimisations on,
    on the CPU or (device 'cuda[:N]') ORT's CUDA provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index})]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(graph, options, providers=providers)


def deployed_graph(model: nn.Module, input_shape: tuple[int, ...], what: str, normalize: tuple | None = None
                   ) -> bytes:
    """The ONNX graph `export` writes for `model` (with the data's (mean, std) folded in, when given), once its
    outputs matched PyTorch's on a random batch; `what` names the network in the one-line error raised when it
    cannot be exported or does not match."""
    model = _cpu_copy(model)
    if normalize is not None and not isinstance(model, torch.jit.ScriptModule):  # a TorchScript teacher is exported
        model = Deployable(model, *normalize).eval()  # alone: the TorchScript exporter cannot trace it as a part
    pixels = torch.Generator().manual_seed(0)
    example = torch.rand(2, *input_shape, generator=pixels) * 255  # batch 2: a batch of 1 would pin the batch size
    fix = "set latency.runtime = 'torch' for this study"
    try:
        graph = to_onnx(model, example)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
        raise KdsearchError(f"{what} cannot be exported to ONNX for latency timing ({root_cause(e)}): {fix}, or "
                            "keep its forward traceable by torch.export (no data-dependent Python control "
                            "flow)") from None
    try:
        worst = mismatch(graph, model, torch.rand(3, *input_shape, generator=pixels) * 255)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's session or kernels, or the eager forward
        raise KdsearchError(f"{what}'s ONNX graph does not run in ONNX Runtime ({root_cause(e)}): {fix}") from None
    if not worst <= 1:  # NaN outputs too
        raise KdsearchError(f"{what}'s ONNX graph does not match PyTorch (outputs differ by {worst:.3g}x the "
                            f"tolerance, atol {ATOL} + rtol {RTOL}): {fix}")
    return graph


def root_cause(e: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps torch.export's error in a generic one."""
    while e.__cause__ is not None:
        e = e.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))  # without the terminal colours it may carry


def mismatch(graph: bytes, model: nn.Module, x: torch.Tensor) -> float:
    """The largest |onnx - torch| / (ATOL + RTOL * |torch|) over the outputs for batch `x`: at most 1 matches."""
    with torch.inference_mode():
        expected = model(x).numpy()
    got = session(graph, threads=1).run(None, {"images": x.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected) / (ATOL + RTOL * np.abs(expected))))


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A float32, contiguous, eval-mode copy on the CPU (a student may be in channels_last or on a GPU)."""
    import copy

    return copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
