"""Capturing what a model hands the processor and ``generate``, and comparing it byte for byte: the request-equality
tests of every host (``test_eval_qwen``, ``test_eval_onevision``, ``test_eval_video``, ``test_eval_onevision_video``)
put pmod_llava's request beside the one lmms-eval's own model class builds for the same document."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def mmmu_format():
    """MMMU's ``doc_to_messages`` switches its module to the interleaved format for the rest of the process (as in
    lmms-eval); restored after each test so that other tests see the default. Autouse where a test module imports it."""
    from lmms_eval.tasks.mmmu import utils

    before = utils.config["metadata"]["interleaved_format"]
    yield
    utils.config["metadata"]["interleaved_format"] = before


class Recorder:
    """A processor that records each call's keyword arguments (everything else is the processor's)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def recording_generate(calls: list):
    """A ``generate`` that records its keyword arguments and answers two fixed tokens per row."""
    def generate(**kwargs):
        calls.append(kwargs)
        ids = kwargs["input_ids"]
        return torch.cat([ids, torch.tensor([[40, 41]] * ids.shape[0])], dim=1)

    return generate


def tensor_bytes(t: torch.Tensor) -> tuple:
    """(dtype, shape, raw bytes): what two byte-identical tensors share."""
    return t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).flatten().numpy().tobytes()


def same(a, b, where: str) -> None:
    """Equal values; tensors equal in dtype, shape and bytes; lists element by element; dicts key by key; PIL images by
    their pixels."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and tensor_bytes(a) == tensor_bytes(b), where
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif hasattr(a, "tobytes") and hasattr(a, "size"):  # PIL
        assert (a.size, a.mode, a.tobytes()) == (b.size, b.mode, b.tobytes()), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_call(ours: dict, theirs: dict, where: str) -> None:
    """Two calls' keyword arguments: the same keys, each value :func:`same`."""
    assert sorted(ours) == sorted(theirs), f"{where}: keys {sorted(ours)} vs {sorted(theirs)}"
    for key in theirs:
        same(ours[key], theirs[key], f"{where}, {key}")
