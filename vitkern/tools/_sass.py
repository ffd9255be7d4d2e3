"""Reading sm_90 SASS: functions, loops and the instruction mix of each loop body.

``cuobjdump -sass`` prints one ``Function : <mangled name>`` header per kernel, then one line per instruction,
``/*<hex address>*/  [@[!]P<n>] OPCODE[.MODIFIERS] operands ;``. A loop is a backward branch: a ``BRA`` whose target
address is below its own; its body is every instruction from the target to the branch, both included. The
``BRA`` to its own address that ends every kernel (the trap after ``EXIT``) and the ``NOP`` padding after it are not
code that runs.

Classes (the opcode before the first dot, with a few exceptions):

* ``ffma``: FFMA (fp32 fused multiply-add, 32 multiply-adds per warp instruction), FFMA2 (64).
* ``hfma2``: HFMA2 (two fp16 multiply-adds per lane, 64 per warp instruction); ``HFMA2.MMA R, -RZ, RZ, a, b`` is
  how ptxas writes a register move of a constant, and is counted as ``int``.
* ``mma``: tensor-core HMMA (``HMMA.16816``: m16n8k16 per warp), HGMMA (``HGMMA.64xNxK``: 64 x N x K per warpgroup of
  4 warps, each of which issues it), IMMA (counted, its integer multiply-adds not).
* ``lds`` / ``sts``: shared-memory loads (LDS, LDSM) and stores (STS).
* ``ldg`` / ``stg``: global loads (LDG, LD, LDGSTS, the ``cp.async`` copy, UTMALDG) and stores (STG, ST, RED, ATOM,
  ATOMG, UTMASTG).
* ``int``: integer, address and move instructions (IMAD, IADD3, LEA, SHF, LOP3, ISETP, MOV, SEL, ... and the uniform
  datapath's U* instructions).
* ``other``: everything else (FADD, FMUL, MUFU, conversions, branches, barriers, ...).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vitkern.tools.kernel_report import cuobjdump_path

CLASSES = ("ffma", "hfma2", "mma", "lds", "sts", "ldg", "stg", "int", "other")
FMA_CLASSES = ("ffma", "hfma2", "mma")
WARP_SIZE = 32
WARPGROUP_WARPS = 4

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)([^;]*);"
)
_BRANCH_TARGET = re.compile(r"^\s*(?:0x)?([0-9a-f]+)\s*$")
_HMMA_SHAPE = re.compile(r"^\.(16|8)(8)(\d+)")  # "16816": m16 n8 k16, "1684": m16 n8 k4
_HGMMA_SHAPE = re.compile(r"^\.(\d+)x(\d+)x(\d+)")

_OPCODE_CLASSES = {
    "FFMA": "ffma",
    "FFMA2": "ffma",
    "HFMA2": "hfma2",
    "HMMA": "mma",
    "HGMMA": "mma",
    "IMMA": "mma",
    "IGMMA": "mma",
    "LDS": "lds",
    "LDSM": "lds",
    "STS": "sts",
    "LDG": "ldg",
    "LD": "ldg",
    "LDGSTS": "ldg",
    "UTMALDG": "ldg",
    "STG": "stg",
    "ST": "stg",
    "RED": "stg",
    "REDG": "stg",
    "ATOM": "stg",
    "ATOMG": "stg",
    "UTMASTG": "stg",
}
_INT_OPCODES = frozenset(
    (
        "IMAD",
        "IADD3",
        "VIADD",
        "IADD",
        "IMUL",
        "LEA",
        "SHF",
        "SHL",
        "SHR",
        "LOP3",
        "LOP",
        "ISETP",
        "IMNMX",
        "VIMNMX",
        "VIADDMNMX",
        "IABS",
        "SEL",
        "PRMT",
        "MOV",
        "MOV32I",
        "I2I",
        "BMSK",
        "BREV",
        "FLO",
        "POPC",
        "S2R",
        "S2UR",
        "CS2R",
        "LDC",
        "R2UR",
        "P2R",
        "R2P",
        "PLOP3",
        "SGXT",
    )
)


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: address (bytes), opcode (before the first dot), modifiers (".16816.F32"), operands."""

    address: int
    opcode: str
    modifiers: str
    operands: str

    @property
    def kind(self) -> str:
        """The instruction's class (module docstring)."""
        if self.opcode == "HFMA2" and self.operands.replace(" ", "").split(",")[1:3] == ["-RZ", "RZ"]:
            return "int"
        if self.opcode in _OPCODE_CLASSES:
            return _OPCODE_CLASSES[self.opcode]
        if self.opcode in _INT_OPCODES or (self.opcode.startswith("U") and self.opcode not in ("UTMALDG", "UTMASTG")):
            return "int"
        return "other"

    @property
    def macs(self) -> int:
        """Multiply-adds one warp's issue of this instruction performs (0 for non-FMA classes)."""
        if self.opcode == "FFMA":
            return WARP_SIZE
        if self.opcode in ("FFMA2", "HFMA2"):
            return 0 if self.kind == "int" else 2 * WARP_SIZE
        if self.opcode == "HMMA" and (match := _HMMA_SHAPE.match(self.modifiers)):
            m, n, k = (int(v) for v in match.groups())
            return m * n * k
        if self.opcode == "HGMMA" and (match := _HGMMA_SHAPE.match(self.modifiers)):
            m, n, k = (int(v) for v in match.groups())
            return m * n * k // WARPGROUP_WARPS
        return 0

    @property
    def precision(self) -> str | None:
        """The input precision of a tensor-core HMMA / HGMMA ("fp16", "bf16", "tf32"), else None."""
        if self.opcode not in ("HMMA", "HGMMA"):
            return None
        modifiers = self.modifiers.split(".")
        return "tf32" if "TF32" in modifiers else "bf16" if "BF16" in modifiers else "fp16"

    @property
    def branch_target(self) -> int | None:
        """The target address of a BRA with an immediate target, else None."""
        if self.opcode != "BRA":
            return None
        match = _BRANCH_TARGET.match(self.operands.split(",")[-1])
        return int(match.group(1), 16) if match else None


@dataclass(frozen=True)
class Mix:
    """Instruction counts by class of a stretch of code, and the multiply-adds one warp's pass through it does."""

    counts: dict[str, int] = field(default_factory=dict)
    macs: int = 0
    tensor_macs: dict[str, int] = field(default_factory=dict)  # of ``macs``, those on tensor cores, by precision

    @classmethod
    def of(cls, instructions: list[Instruction]) -> Mix:
        counts = Counter(ins.kind for ins in instructions)
        tensor: Counter[str] = Counter()
        for ins in instructions:
            if ins.precision is not None:
                tensor[ins.precision] += ins.macs
        return cls({kind: counts.get(kind, 0) for kind in CLASSES}, sum(ins.macs for ins in instructions), dict(tensor))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fma(self) -> int:
        return sum(self.counts.get(kind, 0) for kind in FMA_CLASSES)

    @property
    def fma_share(self) -> float:
        return self.fma / self.total if self.total else 0.0


@dataclass(frozen=True)
class Loop:
    """A backward branch's body: the addresses [start, end] (the branch itself at ``end``) and the mix of its own
    instructions (those of loops nested in it left out)."""

    start: int
    end: int
    mix: Mix
    innermost: bool


@dataclass
class Function:
    """One kernel's SASS: its mangled name and the instructions that run (trap loop and padding left out)."""

    name: str
    instructions: list[Instruction]

    def loops(self) -> list[Loop]:
        """Every loop (backward branch), in address order of its branch."""
        spans = []
        for ins in self.instructions:
            target = ins.branch_target
            if target is not None and target < ins.address:
                spans.append((target, ins.address))
        loops = []
        for start, end in spans:
            inner = [s for s in spans if s != (start, end) and start <= s[0] and s[1] <= end]
            body = [
                ins
                for ins in self.instructions
                if start <= ins.address <= end and not any(lo <= ins.address <= hi for lo, hi in inner)
            ]
            loops.append(Loop(start, end, Mix.of(body), not inner))
        return loops

    def hot_loop(self) -> Loop | None:
        """The loop that does the most multiply-adds per iteration; without any, the largest innermost loop.
        Ties go to the innermost, then the shortest body. None for straight-line code."""
        loops = self.loops()
        if not loops:
            return None
        if any(loop.mix.macs for loop in loops):
            return max(loops, key=lambda loop: (loop.mix.macs, loop.innermost, -loop.mix.total))
        return max((loop for loop in loops if loop.innermost), key=lambda loop: loop.mix.total)

    def mix(self) -> Mix:
        return Mix.of(self.instructions)


def parse_sass(text: str) -> list[Function]:
    """The functions of ``cuobjdump -sass`` output, in the order printed."""
    functions: list[Function] = []
    for line in text.splitlines():
        if match := _FUNCTION.match(line):
            functions.append(Function(match.group(1), []))
        elif functions and (match := _INSTRUCTION.match(line)):
            address, opcode, modifiers, operands = match.groups()
            functions[-1].instructions.append(Instruction(int(address, 16), opcode, modifiers, operands.strip()))
    for function in functions:
        function.instructions = _running_code(function.instructions)
    return functions


def _running_code(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions before the trap loop (a BRA to itself) that ends the kernel; all of them if there is none."""
    for index in range(len(instructions) - 1, -1, -1):
        if instructions[index].branch_target == instructions[index].address:
            return instructions[:index]
    return instructions


def dump_sass(path: str | Path, arch: int = 90) -> list[Function]:
    """``cuobjdump -sass -arch sm_<arch>`` of a cubin or a shared library, parsed."""
    command = [cuobjdump_path(), "-sass", str(path)]
    if Path(path).suffix != ".cubin":
        command[2:2] = ["-arch", f"sm_{arch}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed: {result.stderr.strip()}")
    return parse_sass(result.stdout)
