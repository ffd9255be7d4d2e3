"""What differs between the Triton releases vitkern supports (3.6 to 3.8), in one place.

``NARROW_TILES``: before triton 3.8 the compiler keeps more values live in some kernels, and the kernel report
(``python -m vitkern.tools.kernel_report``) on triton 3.6.0 found configurations that spill registers (4 to 56 bytes
per thread) and are spill-free on 3.8.0: the attention forward at 64 x 64 tiles (head dims up to 32, fp16/bf16) and
at 32 x 32 tiles with 128-wide heads, the fp32 dq kernel on two warps, the table-gradient kernel's 64-wide bin
blocks at head dims 64 and 128, and the channels_last epilogue backward of the depthwise convolution (which now
takes the narrower tile on every release). With ``NARROW_TILES`` the launchers pick smaller tiles or more warps for
those (the kernel report lists what they pick on the triton it runs on). triton 3.7 was not measured and takes the
older rule.
"""

from __future__ import annotations

import triton


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


TRITON_RELEASE = _release(triton.__version__)
NARROW_TILES = TRITON_RELEASE < (3, 8)
