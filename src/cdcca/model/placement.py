"""Where the cloud's computing happens: the ``--torch-device`` every computing command takes.

The name is checked before any model loads (a typo or a missing GPU fails in one line, not after
minutes of loading). Models and the tensors fed to them move to the device; data stays on the CPU
where it is cached, and results come back on the CPU (they are stored, hashed and compared there).
"""

from __future__ import annotations

import dataclasses

import torch

from cdcca.model.prompt import TextBatch


def check_torch_device(name: str | None) -> str:
    """``name`` checked and normalised (None → ``"cpu"``); ValueError naming the fix otherwise."""
    name = (name or "cpu").strip()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--torch-device {name!r} is not a torch device name (use cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--torch-device {name}: no CUDA device is visible on this machine (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--torch-device {name}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--torch-device {name}: MPS is not available on this machine (use cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--torch-device {name}: only cpu, cuda[:N] and mps are supported")
    return name


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def text_to(text: TextBatch, device: torch.device) -> TextBatch:
    """A tokenized batch on ``device`` (a no-op on the CPU: the same tensors)."""
    return dataclasses.replace(text, **{f.name: None if getattr(text, f.name) is None else getattr(text, f.name).to(device)
                                        for f in dataclasses.fields(text)})
