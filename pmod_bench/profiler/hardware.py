"""Accelerator peak numbers, for achieved TFLOP/s, MFU and roofline floors.

Peak = dense BF16 tensor-core throughput (no 2:4 sparsity) and memory bandwidth, from NVIDIA's
datasheets; where a datasheet gives only the sparse figure, dense = half of it (H100 SXM: 1,979 -> 989,
H100 PCIe: 1,513 -> 756, H200 NVL: 1,671 -> 835). A MIG slice has a fraction of the peak: MFU against
the whole GPU's is not meaningful there. MFU (model FLOPs utilisation, PaLM Appendix B) = model FLOPs / time / peak.

Roofline floor of a phase (Williams et al. 2009): max(FLOPs / peak, bytes moved / bandwidth), with
bytes = the weights the phase reads once (bf16) + the KV cache it writes (prefill) or reads (decode).
Activations are not counted, so the floor is a lower bound: no implementation can beat it.
"""

from __future__ import annotations

from .errors import ProfileError

import difflib
import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float
    """dense BF16 tensor-core peak, TFLOP/s"""
    mem_bw_gbs: float
    """memory bandwidth, GB/s (10^9 bytes/s)"""
    memory_gb: float
    source: str

    def roofline_ms(self, flops: float, bytes_moved: float) -> float:
        """Lower bound on the time of a phase, ms."""
        return 1e3 * max(flops / (self.bf16_tflops * 1e12), bytes_moved / (self.mem_bw_gbs * 1e9))

    def bound(self, flops: float, bytes_moved: float) -> str:
        """'compute' or 'memory': which roof the phase hits."""
        return "compute" if flops / (self.bf16_tflops * 1e12) >= bytes_moved / (self.mem_bw_gbs * 1e9) else "memory"


#: key -> Hardware. Keys are matched case-insensitively, ignoring '-', '_' and spaces.
HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("A6000", 154.8, 768, 48, "NVIDIA RTX A6000 datasheet: 309.7 TFLOPS BF16 with sparsity; 768 GB/s GDDR6 (the paper's GPU)"),
        Hardware("A100-80GB-SXM", 312, 2039, 80, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense; 2,039 GB/s HBM2e"),
        Hardware("A100-80GB-PCIe", 312, 1935, 80, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense; 1,935 GB/s HBM2e"),
        Hardware("A100-40GB", 312, 1555, 40, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense; 1,555 GB/s HBM2"),
        Hardware("H100-SXM", 989, 3350, 80, "NVIDIA H100 datasheet: 1,979 TFLOPS BF16 with sparsity; 3.35 TB/s HBM3"),
        Hardware("H100-PCIe", 756, 2000, 80, "NVIDIA H100 datasheet: 1,513 TFLOPS BF16 with sparsity; 2.0 TB/s HBM2e"),
        Hardware("H100-NVL", 835, 3900, 94, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS BF16 with sparsity; 3.9 TB/s HBM3"),
        Hardware("H200", 989, 4800, 141, "NVIDIA H200 datasheet, H200 SXM: 1,979 TFLOPS BF16 with sparsity; 4.8 TB/s HBM3e"),
        Hardware("H200-NVL", 835, 4800, 141, "NVIDIA H200 datasheet, H200 NVL (PCIe card): 1,671 TFLOPS BF16 with sparsity; "
                 "4.8 TB/s HBM3e"),
        Hardware("GH200", 989, 4000, 96, "NVIDIA GH200 Grace Hopper datasheet: 1,979 TFLOPS BF16 with sparsity (the H100 SXM's "
                 "tensor cores); 4 TB/s HBM3 (96 GB; the 144 GB HBM3e version: 4.9 TB/s)"),
        Hardware("L40S", 362, 864, 48, "NVIDIA L40S datasheet: 733 TFLOPS BF16 with sparsity; 864 GB/s GDDR6"),
        Hardware("L4", 121, 300, 24, "NVIDIA L4 datasheet: 242 TFLOPS BF16 with sparsity; 300 GB/s GDDR6"),
        Hardware("A10", 125, 600, 24, "NVIDIA A10 datasheet: 125 TFLOPS BF16 dense; 600 GB/s GDDR6"),
        Hardware("B200", 2250, 8000, 180, "NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 dense per 8 GPUs -> 2.25 PFLOPS BF16 dense per GPU; 8 TB/s HBM3e"),
    )
}

_ALIASES = {
    "rtxa6000": "A6000", "a6000": "A6000", "a100": "A100-80GB-SXM", "a10080gb": "A100-80GB-SXM",
    "a100sxm": "A100-80GB-SXM", "a100sxm480gb": "A100-80GB-SXM", "a100pcie": "A100-80GB-PCIe",
    "a10040gb": "A100-40GB", "a100sxm440gb": "A100-40GB", "h100": "H100-SXM", "h100sxm": "H100-SXM",
    "h100sxm5": "H100-SXM", "h10080gbhbm3": "H100-SXM", "h100pcie": "H100-PCIe", "h100nvl": "H100-NVL",
    "h200": "H200", "h200sxm": "H200", "h200nvl": "H200-NVL", "gh200": "GH200", "l40s": "L40S", "l4": "L4", "a10": "A10", "a10g": "A10", "b200": "B200",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower().replace("nvidia", ""))


class HardwareError(ProfileError):
    pass


def get_hardware(name: str) -> Hardware:
    """A Hardware by name ('A6000', 'h100-sxm', 'H100 PCIe', ...); errors list the known ones."""
    key = _norm(name)
    for known in HARDWARE:
        if _norm(known) == key:
            return HARDWARE[known]
    if key in _ALIASES:
        return HARDWARE[_ALIASES[key]]
    close = difflib.get_close_matches(str(name), list(HARDWARE), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise HardwareError(f"unknown hardware '{name}'.{hint} Known: {', '.join(HARDWARE)}.")


def detect_hardware(device_name: Optional[str]) -> Optional[Hardware]:
    """Map a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA RTX A6000', ...) to a table entry."""
    if not device_name:
        return None
    n = _norm(device_name)
    rules = [
        ("rtxa6000", "A6000"), ("h100nvl", "H100-NVL"), ("h100pcie", "H100-PCIe"), ("h100", "H100-SXM"),
        ("gh200", "GH200"), ("h200nvl", "H200-NVL"), ("h200", "H200"), ("a100sxm480gb", "A100-80GB-SXM"), ("a10080gbpcie", "A100-80GB-PCIe"),
        ("a100pcie80gb", "A100-80GB-PCIe"), ("a10040gb", "A100-40GB"), ("a100sxm440gb", "A100-40GB"),
        ("a100", "A100-80GB-SXM"), ("l40s", "L40S"), ("l4", "L4"), ("a10", "A10"), ("b200", "B200"),
    ]
    for pattern, key in rules:
        if pattern in n:
            return HARDWARE[key]
    return None


__all__ = ["Hardware", "HARDWARE", "HardwareError", "get_hardware", "detect_hardware"]
