"""What ``advisor apply -o`` ships, and the check that it is the model the trial measured.

Each file holds the trial's inference graph, exported with ``torch.export``: its inference
precision (autocast, or the cast of inputs to half-precision weights), any batch size (and,
on a variable-length workload, any sequence length, unless its int8 graph was captured at
one: ``Shipped.length``). A model whose outputs ``torch.export`` refuses (a Hugging Face
cache) is shipped returning its logits. Inputs are positional, in the order ``keys`` names
for a model that takes keywords. By what the trial ran:

- eagerly: the ``torch.export`` program, ``torch.export.load(path).module()``;
- PT2E int8 (int8-static, qat-int8), which the trial ran compiled with inductor's freezing:
  the program, with the recipe that compiles it as the trial did (``RECIPE``)::

      import torchao.quantization.pt2e  # registers PT2E's quantize/dequantize ops
      torch._inductor.config.freezing = True
      m = torch.export.load(path).module()
      model = torch.compile(torch.fx.GraphModule(m, m.graph), dynamic=False)

  (``torch.fx.GraphModule(m, m.graph)``: the graph without the per-call input checks
  ``.module()`` adds as forward pre-hooks, which run in Python outside the compiled graph)

  Not an AOTInductor package: on torch 2.13 AOTInductor gets this graph wrong at a dynamic
  batch size, or slow without freezing (``_compile``);
- otherwise compiled: an AOTInductor package, loaded with torch alone,
  ``torch._inductor.aoti_load_package(path)``, its weights stored apart from the code.

The bytes the weights take in the file are read back from it and shown beside the whole
file's (an AOTInductor package's compiled code is about 1.5 MB even for a tiny model). In a
``torch.export`` program they are the trial's size objective (``measure.weight_bytes``).

``check`` loads the file in a fresh process, as a user would, and measures it there: its
latency at the study's latency batch and at batch 1, each paired (timed interleaved) with the
baseline's model like a trial's, and its accuracy on the validation split's two parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from advisor.errors import AdvisorError, first_line
from advisor.techniques import precision, quantization
from advisor.techniques.precision import PrecisionConfig
from advisor.trial.compress import CastInputs, Deployable
from advisor.workload import Inputs, WorkloadRef, call_args, call_model, logits_of, to_device

KEYS = "advisor.keys"  # the package metadata entry naming keyword inputs, in order
RECIPE = "advisor.recipe"  # an exported program's extra file: how the trial compiled it (JSON)


@dataclass
class Shipped:
    path: Path
    # "aoti" (an AOTInductor package), "export" (a torch.export program), "compile" (a
    # torch.export program to compile as the recipe says) or "state_dict" (the fallback)
    format: str
    file_bytes: int
    weights_bytes: int | None  # the weights' bytes as stored in the file; None where not apart
    keys: tuple[str, ...]  # keyword inputs, in the positional order the file takes them
    why_not: str = ""  # format "state_dict": why the model could not be exported or compiled
    length: int | None = None  # a variable-length workload's sequence length the file is fixed to
    compile: str | None = None  # format "compile": the torch.compile mode, under freezing

    @property
    def load(self) -> str:
        """The line that loads it."""
        if self.format == "aoti":
            return f'torch._inductor.aoti_load_package("{self.path}")'
        if self.format == "state_dict":
            return f'torch.load("{self.path}")["state_dict"], into your model rebuilt with the knobs'
        if self.format == "compile":
            mode = f', mode="{self.compile}"' if self.compile != "default" else ""
            return (f'import torchao.quantization.pt2e; torch._inductor.config.freezing = True; '
                    f'm = torch.export.load("{self.path}").module(); '
                    f'model = torch.compile(torch.fx.GraphModule(m, m.graph), dynamic=False{mode})')
        return f'torch.export.load("{self.path}").module()'

    def describe(self) -> str:
        if self.format == "state_dict":
            return f"its state dict with the knobs ({self.why_not}); load: {self.load}"
        kind = {"aoti": "AOTInductor package", "export": "torch.export program",
                "compile": "torch.export program to compile with freezing"}[self.format]
        weights = (f", weights {self.weights_bytes / 2**20:.3g} MiB of it"
                   if self.weights_bytes is not None else "")
        called = f"; call it with ({', '.join(self.keys)})" if self.keys else ""
        fixed = f", padded to length {self.length}" if self.length is not None else ""
        return f"{kind}, {self.file_bytes / 2**20:.3g} MiB{weights}; load: {self.load}{called}{fixed}"


class Inference(nn.Module):
    """The deployable model as the trial called it, inputs by position: under its autocast,
    floating-point inputs cast for half-precision weights, and optionally only its logits."""

    def __init__(self, inner: nn.Module, keys: tuple[str, ...], autocast: PrecisionConfig,
                 device_type: str, logits: bool = False) -> None:
        super().__init__()
        self.inner, self.keys, self.autocast, self.device_type = inner, keys, autocast, device_type
        self.logits = logits

    def forward(self, *values):
        with precision.autocast(self.autocast, self.device_type):
            out = self.inner(**dict(zip(self.keys, values, strict=True))) if self.keys else self.inner(*values)
        return logits_of(out) if self.logits else out


def package(deploy: Deployable, inputs: Inputs, path: Path, *, autocast: PrecisionConfig,
            variable_length: bool = False, knobs: dict | None = None) -> Shipped:
    """Write ``deploy`` to ``path`` as the file a user runs; see the module docstring. A model
    that cannot be exported or compiled is saved as its state dict with ``knobs`` (``.pt``)."""
    writable(path)
    device = next((t.device for t in deploy.module.state_dict().values()), torch.device("cpu"))
    args, kwargs = call_args(to_device(inputs, device))
    keys = tuple(kwargs)
    values = tuple(kwargs.values()) if kwargs else args
    inner = CastInputs(deploy.module, deploy.input_dtype) if deploy.input_dtype else deploy.module
    mode = deploy.info.get("compile", "none")
    try:
        program = _export(inner, keys, values, autocast, device.type, variable_length)
        length = _fixed_length(program) if variable_length else None
        if mode == "none" or deploy.info.get("quantization") in quantization.PT2E:
            recipe = {} if mode == "none" else {"compile": mode}
            _save(program, path, recipe)
            return Shipped(path, "compile" if recipe else "export", path.stat().st_size,
                           _stored_bytes(path, ("/data/weights/", "/data/constants/")), keys,
                           length=length, compile=mode if recipe else None)
        _compile(program, path, mode, keys)
        return Shipped(path, "aoti", path.stat().st_size, _stored_bytes(path, ("_weights.blob",)), keys,
                       length=length)
    except AdvisorError as exc:
        # The run's model is not lost: its weights, beside the asked path, with the knobs.
        fallback = path.with_suffix(".pt")
        torch.save({"state_dict": deploy.module.state_dict(), "knobs": knobs, "why_not_exported": str(exc)},
                   fallback)
        if fallback != path:
            path.unlink(missing_ok=True)
        return Shipped(fallback, "state_dict", fallback.stat().st_size, None, keys, why_not=str(exc))


def writable(path: Path) -> None:
    """Refuse, with one line, a path the file cannot be written to (before a run, not after)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise AdvisorError(f"cannot write {path}: {exc.strerror or exc}; choose another -o PATH") from None


def _export(inner: nn.Module, keys, values, autocast, device_type: str, variable_length: bool):
    auto = torch.export.Dim.AUTO

    def dims(value: torch.Tensor) -> dict:
        # AUTO, not DYNAMIC, on the sequence: a graph captured at one length (PT2E int8-static)
        # is exported at it, where DYNAMIC is refused ("Constraints violated"); ``length`` says so.
        return {0: auto, 1: auto} if variable_length and value.dim() >= 2 else {0: auto}

    shapes = {"values": tuple(dims(v) for v in values)}
    with torch.no_grad():
        try:
            return torch.export.export(Inference(inner, keys, autocast, device_type), values,
                                       dynamic_shapes=shapes)
        except Exception as exc:
            try:  # outputs export cannot flatten (a cache): the logits only
                return torch.export.export(Inference(inner, keys, autocast, device_type, logits=True),
                                           values, dynamic_shapes=shapes)
            except Exception:
                raise AdvisorError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}") from None


def _save(program, path: Path, recipe: dict) -> None:
    """The program, without the example inputs ``torch.export`` keeps (a batch of the user's
    data has no place in the model file), with the compile recipe among its extra files."""
    program.example_inputs = None
    try:
        torch.export.save(program, path, extra_files={RECIPE: json.dumps(recipe)})
    except Exception as exc:
        raise AdvisorError(f"torch.export.save failed: {type(exc).__name__}: {first_line(exc)}") from None


def _fixed_length(program) -> int | None:
    """The sequence length (dim 1) an exported program's inputs are fixed to, if it is: a graph
    captured at one length (PT2E int8-static) keeps it; None where it takes any length."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    for node in program.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            shape = getattr(node.meta.get("val"), "shape", ())
            if len(shape) >= 2 and is_concrete_int(shape[1]):  # a SymInt specialized to a constant
                return int(shape[1])
    return None


def _compile(program, path: Path, mode: str, keys: tuple[str, ...]) -> None:
    import torch._inductor.config as inductor_config
    from torch._inductor import aoti_compile_and_package, list_mode_options

    options = {k: v for k, v in (list_mode_options(mode) or {}).items() if "cudagraph" not in k}
    options.update({"freezing": True, "aot_inductor.metadata": {KEYS: json.dumps(list(keys))}})
    if hasattr(inductor_config.aot_inductor, "package_constants_on_disk_format"):
        # The weights in a blob of their own, so their bytes can be read back from the file.
        options.update({"aot_inductor.package_constants_in_so": False,
                        "aot_inductor.package_constants_on_disk_format": "binary_blob"})
    try:
        # Not PT2E int8 (``package`` ships it as a program to compile): on torch 2.13 AOTInductor
        # lowers its frozen int8 convolutions wrongly at a dynamic batch size (the digits CNN's
        # package scored 11% where the same graph compiled in-process scored 94-98%; right at a
        # static batch), and left unfrozen it runs dequantize + fp32 kernels 1.6-1.8x slower.
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)
    except Exception as exc:
        raise AdvisorError(f"AOTInductor failed: {type(exc).__name__}: {first_line(exc)}") from None


def _stored_bytes(path: Path, markers: tuple[str, ...]) -> int | None:
    """The bytes of the tensors stored in the archive: its entries whose names hold one of
    ``markers``, their JSON indexes aside (None if there are none)."""
    with zipfile.ZipFile(path) as archive:
        sizes = [i.file_size for i in archive.infolist()
                 if any(m in i.filename for m in markers) and not i.filename.endswith(".json")]
    return sum(sizes) if sizes else None


def load(path: str | os.PathLike, format: str):
    """The shipped model, loaded as its docstring tells a user to."""
    if format == "aoti":
        return torch._inductor.aoti_load_package(str(path))
    extra = {RECIPE: ""}
    if format == "compile":
        import torchao.quantization.pt2e  # noqa: F401  (registers PT2E's quantize/dequantize ops)
    module = torch.export.load(str(path), extra_files=extra).module()
    recipe = json.loads(extra[RECIPE] or "{}")
    if "compile" in recipe:
        # What the trial measured: the same call (torch.compile, dynamic=False, under freezing),
        # on the graph without the unlifted module's forward pre-hooks: they check the inputs in
        # Python on every call, outside the compiled graph (10% of the digits CNN's time at
        # batch 64, 17-21% at batch 1); the compiled graph's guards check shapes anyway.
        from advisor.techniques import compile as compile_technique

        return compile_technique.deploy(torch.fx.GraphModule(module, module.graph), recipe["compile"])
    return module


class Positional:
    """A shipped model called like the workload's model (``model(**batch)`` or ``model(x)``)."""

    def __init__(self, model, keys) -> None:
        self.model, self.keys = model, tuple(keys)

    def __call__(self, *args, **kwargs):
        return self.model(*(kwargs[k] for k in self.keys) if self.keys else args)


# -- the check in a fresh process ---------------------------------------------------------------

def check(shipped: Shipped, ref: WorkloadRef, cache_root: Path, *, latency_batch: int,
          latency_seconds: float, device: str, threads: int, timeout_s: float = 900) -> dict:
    """Load ``shipped`` in a new Python process and measure it there (``_measure``)."""
    spec = {"path": str(shipped.path.resolve()), "format": shipped.format, "keys": list(shipped.keys),
            "ref": asdict(ref), "cache": str(cache_root), "latency_batch": latency_batch,
            "latency_seconds": latency_seconds, "device": device, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="advisor-ship-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        # The workload's modules import as they do here: this process's import path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            done = subprocess.run([sys.executable, "-m", "advisor.ship", str(spec_file), str(out_file)],
                                  capture_output=True, text=True, timeout=timeout_s, cwd=ref.cwd, env=env)
        except subprocess.TimeoutExpired:
            raise AdvisorError(f"measuring {shipped.path} in a fresh process took over "
                               f"{timeout_s:.0f} s") from None
        if done.returncode != 0 or not out_file.exists():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise AdvisorError(f"{shipped.path} failed in a fresh process: "
                               f"{lines[-1] if lines else f'exit status {done.returncode}'}")
        return json.loads(out_file.read_text())


def _measure(spec: dict) -> dict:
    """The shipped file's latency (paired with the baseline's model, as a trial's) and
    accuracy, on the study cache's data: what a new process that loads it measures."""
    from advisor.trial import measure, pipeline
    from advisor.trial.cache import StudyCache

    torch.set_num_threads(spec["threads"])
    if spec["ref"]["cwd"] not in sys.path:  # the workload's modules, to unpickle its model
        sys.path.insert(0, spec["ref"]["cwd"])
    device = torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device("cpu")
    cache, ref = StudyCache(Path(spec["cache"])), WorkloadRef(**spec["ref"])
    _, _, metric = cache.load_workload(ref)
    shipped = Positional(load(spec["path"], spec["format"]), spec["keys"])
    val = cache.split("val")
    batch, one = pipeline.latency_inputs(val, spec["latency_batch"], device)

    @torch.no_grad()
    def infer(inputs=batch):
        return call_model(shipped, inputs)

    latency = measure.time_calls(infer, device, budget_s=spec["latency_seconds"])
    paired = pipeline.paired_latency(infer, pipeline.reference_model(cache, ref, device), batch, one, device,
                                     spec["latency_seconds"])
    scores = measure.evaluate_parts(shipped, val, metric, batch=spec["latency_batch"], device=device,
                                    autocast=contextlib.nullcontext())
    return {"latency": latency.to_dict(), "paired": paired, "accuracy": scores["selection"],
            "confirmation": scores["confirmation"], "samples": scores["samples"]}


if __name__ == "__main__":
    from advisor import logs

    logs.quiet_libraries(os.devnull)
    Path(sys.argv[2]).write_text(json.dumps(_measure(json.loads(Path(sys.argv[1]).read_text()))))
