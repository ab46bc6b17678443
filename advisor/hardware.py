"""What this machine can run well: the facts the search space is made hardware-aware from.

Detection reads capability flags (oneDNN's bf16/fp16 support and the CPU's own flags on
CPU, the GPU's compute capability and bf16 support on CUDA, a C++ compiler or Triton for
``torch.compile``); it never runs a benchmark, so it is cheap and gives the same answer on
every run.

fp16 on CPU needs AMX-FP16 besides oneDNN's word: on an Intel Xeon with AVX512-FP16 but no
AMX, oneDNN reports fp16 support, yet the digits CNN's fp16 fine-tune ran 0.4-6.1 s a step
against 36-127 ms in fp32 (5 trials of one study spent 73% of its trial time), and fp16
weights ran inference 1.16-1.35x the baseline's time.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass

import torch

from advisor.errors import AdvisorError


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" or "cuda"
    name: str
    cores: int
    bf16: bool
    fp16_fast: bool
    compiler: bool
    compiler_note: str
    capability: tuple[int, int] | None
    torch_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def detect(device: str = "auto") -> Hardware:
    """Describe the device trials will run on (``auto``: CUDA when present, else CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise AdvisorError(f"--device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdvisorError(
            "--device cuda was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    cores = usable_cores()
    if use_cuda:
        from torch.utils._triton import has_triton

        triton = has_triton()
        return Hardware(
            device="cuda",
            name=torch.cuda.get_device_name(0),
            cores=cores,
            bf16=torch.cuda.is_bf16_supported(),
            fp16_fast=True,
            compiler=triton,
            compiler_note="" if triton else "torch.compile on CUDA needs Triton, not installed",
            capability=torch.cuda.get_device_capability(0),
            torch_version=torch.__version__,
        )
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    return Hardware(
        device="cpu",
        name=cpu_name(),
        cores=cores,
        bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        fp16_fast=bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()) and "amx_fp16" in cpu_flags(),
        compiler=cxx is not None,
        compiler_note="" if cxx else "torch.compile on CPU needs a C++ compiler (none found)",
        capability=None,
        torch_version=torch.__version__,
    )


# What makes two machines' times comparable: a study is measured on one kind of machine.
FINGERPRINT = ("device", "name", "capability", "cores", "threads", "torch_version", "libraries")
LIBRARIES = ("torchao", "torch-pruning", "transformers")


def fingerprint(hw: Hardware, threads: int | None) -> dict:
    """The machine as a study records it: ``hw`` with the threads a trial runs on and the
    versions of the libraries whose kernels it times."""
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {**hw.to_dict(), "threads": threads or hw.cores, "libraries": versions}


def describe(machine: dict) -> str:
    """A recorded machine in a few words: its device, cores, threads and torch."""
    what = machine.get("name") or machine.get("device", "?")
    parts = [f"{machine['cores']} cores" if "cores" in machine else "",
             f"{machine['threads']} threads" if "threads" in machine else "",
             f"torch {machine['torch_version']}" if "torch_version" in machine else ""]
    return f"{machine.get('device', '?')} {what} ({', '.join(p for p in parts if p)})"


def differences(stored: dict, current: dict) -> list[str]:
    """The fingerprint fields two recorded machines disagree on (fields a study recorded
    before they were part of the fingerprint are not compared)."""
    out = []
    for key in FINGERPRINT:
        if key not in stored:
            continue
        old, new = stored[key], current.get(key)
        if key == "capability":
            old, new = tuple(old) if old else None, tuple(new) if new else None
        if old != new:
            out.append(f"{key} {_short(old)} vs {_short(new)}")
    return out


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
