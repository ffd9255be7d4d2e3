"""Reading sm_90 SASS: functions, loops and the instruction mix of each loop body; basic blocks, and how many times a
launch's warps run each of them (:func:`run_block`, which executes the SASS on the launch's arguments: the section
"execution" below).

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

import functools
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from vitkern.tools.kernel_report import cuobjdump_path

CLASSES = ("ffma", "hfma2", "mma", "lds", "sts", "ldg", "stg", "int", "other")
FMA_CLASSES = ("ffma", "hfma2", "mma")
WARP_SIZE = 32
WARPGROUP_WARPS = 4

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@(!?U?P[0-9T])\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)([^;]*);"
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
    """One SASS instruction: address (bytes), opcode (before the first dot), modifiers (".16816.F32"), operands and
    the guard predicate ("P0", "!UP1"; "" when unguarded)."""

    address: int
    opcode: str
    modifiers: str
    operands: str
    guard: str = ""

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

    def blocks(self) -> list[Block]:
        """The basic blocks (:func:`control_flow`), computed once."""
        return self._compiled().blocks

    def _compiled(self) -> _Compiled:
        if "_compiled_code" not in self.__dict__:
            self.__dict__["_compiled_code"] = _compile(self)
        return self.__dict__["_compiled_code"]


def parse_sass(text: str) -> list[Function]:
    """The functions of ``cuobjdump -sass`` output, in the order printed."""
    functions: list[Function] = []
    for line in text.splitlines():
        if match := _FUNCTION.match(line):
            functions.append(Function(match.group(1), []))
        elif functions and (match := _INSTRUCTION.match(line)):
            address, guard, opcode, modifiers, operands = match.groups()
            functions[-1].instructions.append(
                Instruction(int(address, 16), opcode, modifiers, operands.strip(), guard or "")
            )
    for function in functions:
        function.instructions = _running_code(function.instructions)
    return functions


def _running_code(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions before the trap loop (a BRA to itself) that ends the kernel; all of them if there is none."""
    for index in range(len(instructions) - 1, -1, -1):
        if instructions[index].branch_target == instructions[index].address:
            return instructions[:index]
    return instructions


def dump_sass(path: str | Path, arch: int = 90, functions: tuple[str, ...] = ()) -> list[Function]:
    """``cuobjdump -sass -arch sm_<arch>`` of a cubin or a shared library, parsed; only the functions of these
    mangled names where given."""
    command = [cuobjdump_path(), "-sass", str(path)]
    if Path(path).suffix != ".cubin":
        command[2:2] = ["-arch", f"sm_{arch}"]
    if functions:
        command[2:2] = ["-fun", ",".join(functions)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed: {result.stderr.strip()}")
    return parse_sass(result.stdout)


# --- control flow -------------------------------------------------------------------------------------------------

EXIT_BLOCK = -1  # the successor of a block that ends the thread


@dataclass(frozen=True)
class Block:
    """A basic block: instructions [first, last] (indices into its function's list) and its successors (block
    indices; :data:`EXIT_BLOCK` for EXIT), the taken target first for a conditional branch."""

    first: int
    last: int
    successors: tuple[int, ...]


def _branch_condition(ins: Instruction) -> tuple[str, ...]:
    """The predicates of a BRA that can fall through, all of which must hold for it to be taken: its guard
    ("@P0") and its predicate operand ("BRA P1, target"), each as "P0", "!UP1"; () for an unconditional one."""
    operands = [op.strip() for op in ins.operands.split(",")]
    extra = operands[0] if len(operands) > 1 and _PREDICATE.match(operands[0]) else ""
    return tuple(p for p in (ins.guard, extra) if p)


def control_flow(instructions: list[Instruction]) -> list[Block]:
    """The basic blocks of straight-line-then-branch code: a block starts at the first instruction, at a branch
    target and after a BRA or EXIT; a BRA (guarded or with a predicate operand) may fall through, a guarded EXIT
    too. BRA.DIV (taken only by a divergent warp) is counted as falling through."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    leaders = {0}
    for i, ins in enumerate(instructions):
        if ins.opcode in ("BRA", "EXIT"):
            leaders.add(i + 1)
        if ins.opcode == "BRA":
            target = ins.branch_target
            if target is None or target not in index:
                raise ValueError(f"BRA at {ins.address:#x}: no target inside the function ({ins.operands!r})")
            leaders.add(index[target])
    starts = sorted(i for i in leaders if i < len(instructions))
    block_of = {start: b for b, start in enumerate(starts)}
    blocks = []
    for b, first in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(instructions)) - 1
        ins = instructions[last]
        after = b + 1 if b + 1 < len(starts) else EXIT_BLOCK
        if ins.opcode == "EXIT":
            successors = (EXIT_BLOCK, after) if ins.guard else (EXIT_BLOCK,)
        elif ins.opcode == "BRA" and "DIV" in ins.modifiers.split("."):
            successors = (after,)
        elif ins.opcode == "BRA":
            target = block_of[index[ins.branch_target]]
            successors = (target, after) if _branch_condition(ins) else (target,)
        else:
            successors = (after,)
        blocks.append(Block(first, last, successors))
    return blocks


def reconvergence_points(blocks: list[Block]) -> list[int]:
    """The immediate post-dominator of each block (:data:`EXIT_BLOCK` where only the exit post-dominates it):
    where the lanes of a warp that a branch at its end splits run together again."""
    exit_node = len(blocks)
    full = (1 << (exit_node + 1)) - 1
    pdom = [full] * len(blocks) + [1 << exit_node]

    def node(s: int) -> int:
        return exit_node if s == EXIT_BLOCK else s

    changed = True
    while changed:
        changed = False
        for b in range(len(blocks) - 1, -1, -1):
            meet = full
            for s in blocks[b].successors:
                meet &= pdom[node(s)]
            new = meet | (1 << b)
            if new != pdom[b]:
                pdom[b], changed = new, True
    ipdom = []
    for b in range(len(blocks)):
        others = pdom[b] & ~(1 << b)
        size = others.bit_count()
        d = exit_node
        while others:
            d = (others & -others).bit_length() - 1
            if pdom[d].bit_count() == size:
                break
            others &= others - 1
        ipdom.append(EXIT_BLOCK if d == exit_node else d)
    return ipdom


# --- execution: which blocks a launch's warps run -----------------------------------------------------------------
#
# The integer, predicate and control instructions are executed for every thread of a block, 32 lanes to a warp, on
# the kernel's real arguments (the constant bank: block and grid size at c[0x0][0x0..0x14], parameters from
# c[0x0][PARAM_BASE]); loads return 0, stores and barriers do nothing, float arithmetic runs in fp32 on those
# values. A branch that splits a warp runs one side, then the other, and the lanes meet again at the branch block's
# immediate post-dominator (the SIMT stack). A warp runs a block when at least one of its lanes is active: the
# count of issued instructions is the same whether or not their guards hold.

PARAM_BASE = 0x210
_PREDICATE = re.compile(r"^!?U?P[0-9T]$")
_REGISTER = re.compile(
    r"^(-|~)?(\|)?(U?R)([0-9]+|Z)\|?(?:\.reuse)?(?:\.(64|H0_H0|H1_H1|F32|B[0-3]|H0|H1))?(?:\.reuse)?$"
)
_CONSTANT = re.compile(r"^(-|~)?(\|)?c\[(0x[0-9a-f]+)\]\[(?:(U?R[0-9Z]+)(?:\s*\+\s*)?)?(-?0x[0-9a-f]+)?\]\|?$")
_MASK = (1 << 32) - 1
_NO_EFFECT = frozenset(
    (
        "BAR",
        "BSSY",
        "BSYNC",
        "BREAK",
        "WARPSYNC",
        "NOP",
        "MEMBAR",
        "DEPBAR",
        "ERRBAR",
        "CCTL",
        "YIELD",
        "FENCE",
        "STG",
        "STS",
        "ST",
        "STL",
        "RED",
        "REDG",
        "UTMASTG",
        "ARRIVES",
        "SYNCS",
    )
)
_LOADS = frozenset(("LDG", "LDS", "LD", "LDL", "LDSM", "ATOM", "ATOMG", "ATOMS", "LDGSTS", "SHFL", "VOTE", "MATCH"))


class SimulationError(RuntimeError):
    """An instruction the executor does not know, or a launch that does not finish."""


@dataclass(frozen=True)
class LaunchShape:
    """The constant-bank values of a launch that the executor needs: grid and block size and the parameter bytes."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    params: bytes


class _Machine:
    """The registers of one thread block's lanes (uint32, one column a lane), its predicates and constant bank."""

    def __init__(self, shape: LaunchShape, block_index: tuple[int, int, int]) -> None:
        import numpy as np

        self.np = np
        bx, by, bz = shape.block
        self.lanes = _ceil_to(bx * by * bz, WARP_SIZE)
        lane = np.arange(self.lanes, dtype=np.int64)
        self.special = {
            "SR_TID.X": lane % bx,
            "SR_TID.Y": lane // bx % by,
            "SR_TID.Z": lane // (bx * by),
            "SR_CTAID.X": np.full(self.lanes, block_index[0]),
            "SR_CTAID.Y": np.full(self.lanes, block_index[1]),
            "SR_CTAID.Z": np.full(self.lanes, block_index[2]),
            "SR_LANEID": lane % WARP_SIZE,
        }
        self.special = {k: v.astype(np.uint32) for k, v in self.special.items()}
        self.valid = lane < bx * by * bz
        bank = bytearray(PARAM_BASE + len(shape.params) + 64)
        for i, v in enumerate((*shape.block, *shape.grid)):
            bank[4 * i : 4 * i + 4] = v.to_bytes(4, "little")
        bank[0x28:0x2C] = (0x1000000).to_bytes(4, "little")  # the stack pointer's start
        bank[PARAM_BASE : PARAM_BASE + len(shape.params)] = shape.params
        self.bank = np.frombuffer(bytes(bank), dtype=np.uint8)
        self.r = np.zeros((256, self.lanes), dtype=np.uint32)
        self.ur = np.zeros((64, self.lanes), dtype=np.uint32)
        self.p = np.zeros((8, self.lanes), dtype=bool)
        self.up = np.zeros((8, self.lanes), dtype=bool)
        self.p[7] = self.up[7] = True


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


_FLOAT = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|INF|QNAN|NAN)$")


@dataclass(frozen=True)
class _Operand:
    """A source or destination operand: kind "R", "UR" (registers; index 255 / 63 is RZ / URZ), "P", "UP"
    (predicates; 7 is PT), "C" (constant bank), "I" (integer immediate), "F" (float immediate), "S" (special
    register)."""

    kind: str
    index: int = 0
    negate: bool = False
    invert: bool = False
    absolute: bool = False
    value: float = 0.0
    offset_register: _Operand | None = None
    name: str = ""


def _parse_operand(text: str) -> _Operand:
    text = text.strip()
    if _PREDICATE.match(text):
        kind = "UP" if "UP" in text else "P"
        index = 7 if text.endswith("T") else int(text[-1])
        return _Operand(kind, index, invert=text.startswith("!"))
    if match := _REGISTER.match(text):
        sign, bars, kind, number, _ = match.groups()
        zero = 255 if kind == "R" else 63
        index = zero if number == "Z" else int(number)
        return _Operand(kind, index, negate=sign == "-", invert=sign == "~", absolute=bool(bars))
    if match := _CONSTANT.match(text):
        sign, bars, bank, register, offset = match.groups()
        if int(bank, 16) != 0:
            return _Operand("I", 0)  # other banks (compiler constants) read as 0
        base = _parse_operand(register) if register else None
        return _Operand("C", int(offset or "0x0", 16), negate=sign == "-", absolute=bool(bars), offset_register=base)
    if text.startswith("SR_") or text in ("SRZ", "PR", "UPR"):
        return _Operand("S", name=text)
    if re.match(r"^-?0x[0-9a-f]+$", text):
        return _Operand("I", int(text, 16) & _MASK)
    if _FLOAT.match(text):
        return _Operand("F", value=float(text.replace("QNAN", "nan").replace("NAN", "nan")))
    raise SimulationError(f"operand {text!r}: not understood")


def _split_operands(text: str) -> list[_Operand]:
    parts = [part for part in (p.strip() for p in text.split(",")) if part]
    return [_parse_operand(part) for part in parts]


def _raw(m: _Machine, op: _Operand):
    """The operand's 32 bits in every lane, without its sign, inversion or absolute value."""
    np = m.np
    if op.kind == "R":
        return m.r[op.index]
    if op.kind == "UR":
        return m.ur[op.index]
    if op.kind == "C":
        offset = np.full(m.lanes, op.index, dtype=np.int64)
        if op.offset_register is not None:
            offset = offset + _raw(m, op.offset_register).astype(np.int64)
        offset = np.clip(offset, 0, len(m.bank) - 4)
        b = m.bank.astype(np.uint32)
        return b[offset] | b[offset + 1] << 8 | b[offset + 2] << 16 | b[offset + 3] << 24
    if op.kind == "I":
        return np.full(m.lanes, op.index, dtype=np.uint32)
    if op.kind == "F":
        return np.full(m.lanes, op.value, dtype=np.float32).view(np.uint32)
    if op.kind == "S":
        return m.special.get(op.name, np.zeros(m.lanes, dtype=np.uint32))
    if op.kind in ("P", "UP"):
        return _pred(m, op).astype(np.uint32)
    raise SimulationError(f"operand kind {op.kind}")


def _int(m: _Machine, op: _Operand):
    """The operand as an integer: int64 holding its unsigned value, 2**32 - v negated (so that a negated 0
    carries, as two's complement addition does), ~v inverted, |v| of its signed value."""
    np = m.np
    v = _raw(m, op).astype(np.int64)
    if op.absolute:
        v = np.abs(np.where(v >= 1 << 31, v - (1 << 32), v))
    if op.invert:
        v = _MASK ^ v
    if op.negate:
        v = (_MASK ^ v) + 1
    return v


def _signed(np, v):
    return ((v & _MASK) ^ (1 << 31)) - (1 << 31)


def _float(m: _Machine, op: _Operand):
    np = m.np
    v = _raw(m, op).view(np.float32) if op.kind != "F" else np.full(m.lanes, op.value, dtype=np.float32)
    if op.absolute:
        v = np.abs(v)
    if op.negate:
        v = -v
    return v


def _pred(m: _Machine, op: _Operand):
    v = (m.up if op.kind == "UP" else m.p)[op.index]
    return ~v if op.invert else v


def _pair(m: _Machine, op: _Operand):
    """A 64-bit register pair (or a 32-bit immediate / constant, zero-extended) as uint64."""
    np = m.np
    if op.kind in ("R", "UR"):
        file, zero = (m.r, 255) if op.kind == "R" else (m.ur, 63)
        if op.index == zero:
            return np.zeros(m.lanes, dtype=np.uint64)
        return file[op.index].astype(np.uint64) | file[op.index + 1].astype(np.uint64) << np.uint64(32)
    return _raw(m, op).astype(np.uint64)


def _write(m: _Machine, op: _Operand, value, mask, words: int = 1) -> None:
    np = m.np
    if op.kind in ("P", "UP"):
        if op.index != 7:
            file = m.up if op.kind == "UP" else m.p
            value = np.broadcast_to(np.asarray(value).astype(bool), (m.lanes,))
            file[op.index] = value if mask is None else np.where(mask, value, file[op.index])
        return
    file, zero = (m.r, 255) if op.kind == "R" else (m.ur, 63)
    if op.kind not in ("R", "UR") or op.index == zero:
        return
    value = np.asarray(value)
    if value.dtype == np.float32:
        value = value.view(np.uint32)
    for w in range(words):
        part = (value.astype(np.uint64) >> np.uint64(32 * w)).astype(np.uint64) if words > 1 else value
        part = (part.astype(np.int64) & _MASK).astype(np.uint32) if part.dtype != np.uint32 else part
        if mask is None:
            file[op.index + w] = part
        else:
            file[op.index + w] = np.where(mask, part, file[op.index + w])


def _leading_predicates(ops: list[_Operand], start: int) -> int:
    """How many predicate operands follow position start."""
    n = 0
    while start + n < len(ops) and ops[start + n].kind in ("P", "UP"):
        n += 1
    return n


def _op_imad(m, ops, mods, mask):
    np = m.np
    d, a, b, c = ops[0], ops[1], ops[2], ops[3]
    unsigned = "U32" in mods
    av, bv = _int(m, a), _int(m, b)
    if not unsigned:
        av, bv = _signed(np, av), _signed(np, bv)
    if "WIDE" in mods:
        product = av.astype(np.uint64) * bv.astype(np.uint64) if unsigned else (av * bv).astype(np.uint64)
        _write(m, d, product + _pair(m, c), mask, 2)
        return
    carry = _pred(m, ops[4]).astype(np.int64) if "X" in mods and len(ops) > 4 else 0
    if "HI" in mods:  # the high word of a * b plus the 64-bit c (a register pair)
        product = av.astype(np.uint64) * bv.astype(np.uint64) if unsigned else (av * bv).astype(np.uint64)
        hi = ((product + _pair(m, c)) >> np.uint64(32)).astype(np.int64) & _MASK
        _write(m, d, (hi + carry) & _MASK, mask)
        return
    low = (av.astype(np.uint64) * bv.astype(np.uint64)).astype(np.int64) & _MASK
    _write(m, d, (low + _int(m, c) + carry) & _MASK, mask)


def _op_iadd3(m, ops, mods, mask):
    outs = _leading_predicates(ops, 1)
    d, sources = ops[0], ops[1 + outs : 4 + outs]
    total = sum(_int(m, s) for s in sources)
    if "X" in mods:
        for p in ops[4 + outs :]:
            total = total + _pred(m, p).astype(m.np.int64)
    _write(m, d, total & _MASK, mask)
    carry = total >> 32
    for k in range(outs):
        _write(m, ops[1 + k], carry >= k + 1, mask)


def _op_viadd(m, ops, mods, mask):
    _write(m, ops[0], (_int(m, ops[1]) + _int(m, ops[2])) & _MASK, mask)


def _op_lea(m, ops, mods, mask):
    np = m.np
    outs = _leading_predicates(ops, 1)
    d, rest = ops[0], ops[1 + outs :]
    a = _int(m, rest[0])
    b = _int(m, rest[1])
    if "HI" in mods:
        if "SX32" in mods:
            high, shift_op, tail = np.where(a >= 1 << 31, _MASK, 0), rest[2], rest[3:]
        else:
            high, shift_op, tail = _int(m, rest[2]), rest[3], rest[4:]
        shift = _int(m, shift_op) & 63
        wide = (high.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
        part = ((wide << shift.astype(np.uint64)) >> np.uint64(32)).astype(np.int64) & _MASK
        carry = _pred(m, tail[0]).astype(np.int64) if "X" in mods and tail else 0
        total = part + b + carry
    else:
        shift = _int(m, rest[2]) & 31
        total = ((a << shift) & _MASK) + b
        if "X" in mods and len(rest) > 3:
            total = total + _pred(m, rest[3]).astype(np.int64)
    _write(m, d, total & _MASK, mask)
    for k in range(outs):
        _write(m, ops[1 + k], (total >> 32) >= k + 1, mask)


def _op_shf(m, ops, mods, mask):
    np = m.np
    d, a, s, c = ops
    shift = (_int(m, s) & 63).astype(np.uint64)
    high = _int(m, c)
    if mods & {"S32", "S64"}:
        high = _signed(np, high)
    wide = (high.astype(np.uint64) << np.uint64(32)) | (_int(m, a).astype(np.uint64) & np.uint64(_MASK))
    if "L" in mods:
        out = wide << shift
    elif mods & {"S32", "S64"}:
        out = (wide.astype(np.int64) >> shift.astype(np.int64)).astype(np.uint64)
    else:
        out = wide >> shift
    if "HI" in mods:
        out = out >> np.uint64(32)
    _write(m, d, out.astype(np.int64) & _MASK, mask)


def _lut(np, lut: int, a, b, c):
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _op_lop3(m, ops, mods, mask):
    np = m.np
    start = 1 if ops[0].kind in ("P", "UP") else 0
    d, a, b, c, lut = ops[start : start + 5]
    out = _lut(np, lut.index, _int(m, a) & _MASK, _int(m, b) & _MASK, _int(m, c) & _MASK) & _MASK
    _write(m, d, out, mask)
    if start:
        _write(m, ops[0], out != 0, mask)


def _op_plop3(m, ops, mods, mask):
    np = m.np
    d1, d2, a, b, c, lut1, lut2 = ops[:7]
    va, vb, vc = (_pred(m, x).astype(np.int64) for x in (a, b, c))
    _write(m, d1, _lut(np, lut1.index, va, vb, vc) & 1, mask)
    _write(m, d2, _lut(np, lut2.index, va, vb, vc) & 1, mask)


_COMPARE = {
    "EQ": lambda x, y: x == y,
    "NE": lambda x, y: x != y,
    "LT": lambda x, y: x < y,
    "LE": lambda x, y: x <= y,
    "GT": lambda x, y: x > y,
    "GE": lambda x, y: x >= y,
}


def _combine(mods, t, c):
    if "OR" in mods:
        return t | c
    if "XOR" in mods:
        return t ^ c
    return t & c


def _op_isetp(m, ops, mods, mask):
    np = m.np
    d1, d2, a, b, c = ops[:5]
    x, y = _int(m, a) & _MASK, _int(m, b) & _MASK
    if "U32" not in mods:
        x, y = _signed(np, x), _signed(np, y)
    (cmp,) = mods & set(_COMPARE)
    t = _COMPARE[cmp](x, y)
    if "EX" in mods:
        low = _pred(m, ops[5])
        if cmp == "EQ":
            t = t & low
        elif cmp == "NE":
            t = t | low
        else:
            t = _COMPARE[cmp.replace("E", "T") if cmp in ("LE", "GE") else cmp](x, y) & (x != y) | (x == y) & low
    cv = _pred(m, c)
    _write(m, d1, _combine(mods, t, cv), mask)
    _write(m, d2, _combine(mods, ~t, cv), mask)


def _op_fsetp(m, ops, mods, mask):
    np = m.np
    d1, d2, a, b, c = ops[:5]
    x, y = _float(m, a), _float(m, b)
    names = mods & {f"{k}U" for k in _COMPARE} | mods & set(_COMPARE) | mods & {"NUM", "NAN"}
    (cmp,) = names
    with np.errstate(invalid="ignore"):
        if cmp == "NUM":
            t = ~(np.isnan(x) | np.isnan(y))
        elif cmp == "NAN":
            t = np.isnan(x) | np.isnan(y)
        elif cmp.endswith("U") and cmp[:-1] in _COMPARE:
            t = _COMPARE[cmp[:-1]](x, y) | np.isnan(x) | np.isnan(y)
        else:
            t = _COMPARE[cmp](x, y)
    cv = _pred(m, c)
    if ops[0].kind in ("P", "UP") and len(ops) > 4:
        _write(m, d1, _combine(mods, t, cv), mask)
        _write(m, d2, _combine(mods, ~t, cv), mask)
    return t


def _op_fset(m, ops, mods, mask):
    np = m.np
    d, a, b, c = ops[:4]
    inner = [_Operand("P", 7), _Operand("P", 7), a, b, c]
    t = _op_fsetp(m, inner, mods, np.zeros(m.lanes, dtype=bool))
    t = _combine(mods, t, _pred(m, c))
    one = np.float32(1.0).view(np.uint32) if "BF" in mods else np.uint32(_MASK)
    _write(m, d, np.where(t, one, np.uint32(0)).astype(np.uint32), mask)


def _op_sel(m, ops, mods, mask):
    np = m.np
    d, a, b, p = ops[:4]
    _write(m, d, np.where(_pred(m, p), _int(m, a) & _MASK, _int(m, b) & _MASK), mask)


def _op_mnmx(m, ops, mods, mask):
    np = m.np
    if ops[0].kind == "R" and len(ops) == 5:  # VIADDMNMX d, a, b, c, P: min / max of a + b and c
        d, a, b, c, p = ops
        x, y = (_int(m, a) + _int(m, b)) & _MASK, _int(m, c) & _MASK
    else:
        d, a, b, p = ops[:4]
        x, y = _int(m, a) & _MASK, _int(m, b) & _MASK
    if "U32" not in mods:
        x, y = _signed(np, x), _signed(np, y)
    _write(m, d, np.where(_pred(m, p), np.minimum(x, y), np.maximum(x, y)) & _MASK, mask)


def _op_iabs(m, ops, mods, mask):
    _write(m, ops[0], m.np.abs(_signed(m.np, _int(m, ops[1]))) & _MASK, mask)


def _op_mov(m, ops, mods, mask):
    _write(m, ops[0], _int(m, ops[1]) & _MASK, mask)


def _op_ldc(m, ops, mods, mask):
    words = 2 if "64" in mods else 1
    np = m.np
    value = _raw(m, ops[1]).astype(np.uint64)
    if words == 2:
        high = _Operand("C", ops[1].index + 4, offset_register=ops[1].offset_register)
        value = value | _raw(m, high).astype(np.uint64) << np.uint64(32)
    _write(m, ops[0], value, mask, words)


def _op_s2r(m, ops, mods, mask):
    _write(m, ops[0], _raw(m, ops[1]), mask)


def _op_cs2r(m, ops, mods, mask):
    _write(m, ops[0], m.np.zeros(m.lanes, dtype=m.np.uint64), mask, 2)


def _op_prmt(m, ops, mods, mask):
    np = m.np
    d, a, sel, b = ops[:4]
    wide = (_int(m, b).astype(np.uint64) << np.uint64(32)) | _int(m, a).astype(np.uint64)
    selector = _int(m, sel)
    out = np.zeros(m.lanes, dtype=np.int64)
    for k in range(4):
        index = ((selector >> (4 * k)) & 7).astype(np.uint64)
        byte = ((wide >> (index * np.uint64(8))) & np.uint64(0xFF)).astype(np.int64)
        out |= byte << (8 * k)
    _write(m, d, out & _MASK, mask)


def _op_p2r(m, ops, mods, mask):
    np = m.np
    d, _, a, bits = ops[:4]
    packed = sum(m.p[i].astype(np.int64) << i for i in range(7))
    _write(m, d, (_int(m, a) & ~bits.index | packed & bits.index) & _MASK, mask)


def _op_r2p(m, ops, mods, mask):
    _, a, bits = ops[:3]
    value = _int(m, a)
    for i in range(7):
        if bits.index >> i & 1:
            _write(m, _Operand("P", i), (value >> i) & 1, mask)


def _op_float(m, ops, mods, mask, opcode):
    np = m.np
    with np.errstate(all="ignore"):
        if opcode == "FADD":
            out = _float(m, ops[1]) + _float(m, ops[2])
        elif opcode == "FMUL":
            out = _float(m, ops[1]) * _float(m, ops[2])
        elif opcode == "FFMA":
            out = _float(m, ops[1]) * _float(m, ops[2]) + _float(m, ops[3])
        elif opcode == "FMNMX":
            x, y = _float(m, ops[1]), _float(m, ops[2])
            out = np.where(_pred(m, ops[3]), np.fmin(x, y), np.fmax(x, y)).astype(np.float32)
        elif opcode == "FSEL":
            out = np.where(_pred(m, ops[3]), _raw(m, ops[1]), _raw(m, ops[2]))
        elif opcode == "MUFU":
            x = _float(m, ops[1])
            functions = {"RCP": lambda v: 1 / v, "EX2": np.exp2, "RSQ": lambda v: 1 / np.sqrt(v), "LG2": np.log2}
            function = next((f for name, f in functions.items() if name in mods), np.sin if "SIN" in mods else np.cos)
            out = function(x.astype(np.float64)).astype(np.float32)
        elif opcode == "I2F":
            x = _int(m, ops[1]) & _MASK
            x = x if "U32" in mods else _signed(np, x)
            out = x.astype(np.float32)
            if "RP" in mods:
                out = np.where(out.astype(np.float64) < x, np.nextafter(out, np.float32(np.inf)), out)
        elif opcode == "F2I":
            x = np.nan_to_num(_float(m, ops[1]).astype(np.float64))
            x = np.trunc(x) if "TRUNC" in mods else np.floor(x) if "FLOOR" in mods else np.rint(x)
            low, high = (0, _MASK) if "U32" in mods else (-(1 << 31), (1 << 31) - 1)
            out = np.clip(x, low, high).astype(np.int64) & _MASK
        elif opcode == "HFMA2" and ops[1].kind == "R" and ops[1].index == 255 and len(ops) == 5:
            halves = [np.float16(op.value if op.kind == "F" else 0).view(np.uint16) for op in ops[3:5]]
            out = np.full(m.lanes, int(halves[0]) << 16 | int(halves[1]), dtype=np.uint32)
        else:  # half-precision arithmetic and conversions: data, never a branch condition in vitkern's kernels
            out = np.zeros(m.lanes, dtype=np.uint32)
    _write(m, ops[0], out, mask)


_HANDLERS = {
    "IMAD": _op_imad,
    "IMUL": _op_imad,
    "IADD3": _op_iadd3,
    "VIADD": _op_viadd,
    "LEA": _op_lea,
    "SHF": _op_shf,
    "LOP3": _op_lop3,
    "PLOP3": _op_plop3,
    "ISETP": _op_isetp,
    "FSETP": _op_fsetp,
    "FSET": _op_fset,
    "SEL": _op_sel,
    "IMNMX": _op_mnmx,
    "VIMNMX": _op_mnmx,
    "VIADDMNMX": _op_mnmx,
    "IABS": _op_iabs,
    "MOV": _op_mov,
    "LDC": _op_ldc,
    "S2R": _op_s2r,
    "CS2R": _op_cs2r,
    "R2UR": _op_mov,
    "PRMT": _op_prmt,
    "P2R": _op_p2r,
    "R2P": _op_r2p,
}
_FLOAT_OPCODES = frozenset(
    ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "MUFU", "I2F", "F2I", "HFMA2", "HADD2", "HMUL2", "F2FP", "F2F")
)


def _handler(ins: Instruction):
    """(function(machine, mask), uses 64-bit loads) executing one instruction's effect on the registers."""
    opcode = ins.opcode
    if opcode.startswith("U") and opcode[1:] in _HANDLERS:
        opcode = opcode[1:]  # the uniform datapath's twins: the same effect on UR / UP registers
    if opcode == "S2UR":
        opcode = "S2R"
    mods = frozenset(ins.modifiers.split(".")[1:])
    if opcode in _NO_EFFECT or opcode in ("BRA", "EXIT"):
        return None
    if opcode in _LOADS:  # the value loaded is data: 0
        dest = _parse_operand(ins.operands.split(",")[0])
        words = 4 if "128" in mods else 2 if "64" in mods else 1
        return lambda m, mask: _write(m, dest, m.np.zeros(m.lanes, dtype=m.np.uint64), mask, words)
    ops = _split_operands(ins.operands)
    if opcode in _HANDLERS:
        function = _HANDLERS[opcode]
        return lambda m, mask: function(m, ops, mods, mask)
    if opcode in _FLOAT_OPCODES:
        return lambda m, mask: _op_float(m, ops, mods, mask, opcode)
    raise SimulationError(f"{ins.opcode}{ins.modifiers} at {ins.address:#x}: not an instruction the executor knows")


def _unknown(error: SimulationError, m: _Machine, mask) -> None:
    raise error


@dataclass
class _Compiled:
    blocks: list[Block]
    reconverge: list[int]
    steps: list[list[tuple[Any, _Operand | None]]]  # per block: (effect, guard) of each instruction
    conditions: list[tuple[_Operand, ...] | None]  # per block: the predicates (all must hold) of its final BRA / EXIT


def _compile(function: Function) -> _Compiled:
    blocks = control_flow(function.instructions)
    steps, conditions = [], []
    for block in blocks:
        body = []
        for ins in function.instructions[block.first : block.last + 1]:
            try:
                effect = _handler(ins)
            except SimulationError as error:  # fails where a warp runs it: code a launch never reaches is fine
                effect = functools.partial(_unknown, error)
            if effect is not None:
                body.append((effect, _parse_operand(ins.guard) if ins.guard else None))
        steps.append(body)
        last = function.instructions[block.last]
        condition = None
        if last.opcode == "BRA" and len(block.successors) == 2:
            condition = tuple(_parse_operand(p) for p in _branch_condition(last))
        elif last.opcode == "EXIT" and last.guard:
            condition = (_parse_operand(last.guard),)
        conditions.append(condition)
    return _Compiled(blocks, reconvergence_points(blocks), steps, conditions)


def run_block(
    function: Function, shape: LaunchShape, block_index: tuple[int, int, int], max_steps: int = 2_000_000
) -> list[int]:
    """How many times the warps of one thread block run each basic block of the function (its
    :func:`control_flow` blocks, in order), executing it on the launch's arguments (see above)."""
    compiled = function._compiled()
    m = _Machine(shape, block_index)
    np = m.np
    warps = m.lanes // WARP_SIZE
    counts = [0] * len(compiled.blocks)
    stack: list[list[Any]] = [[0, m.valid.copy(), None]]
    steps = 0
    while stack:
        top = stack[-1]
        b, mask, meet = top
        if b == EXIT_BLOCK or b == meet or not mask.any():
            stack.pop()
            continue
        steps += 1
        if steps > max_steps:
            hottest = compiled.blocks[max(range(len(counts)), key=counts.__getitem__)]
            raise SimulationError(
                f"{function.name}: block {block_index} ran over {max_steps} basic blocks (the most often the one at "
                f"{function.instructions[hottest.first].address:#x})"
            )
        counts[b] += int(mask.reshape(warps, WARP_SIZE).any(axis=1).sum())
        every = None if mask.all() else mask  # None: all lanes active, registers are written whole
        for effect, guard in compiled.steps[b]:
            effect(m, every if guard is None else mask & _pred(m, guard))
        block = compiled.blocks[b]
        condition = compiled.conditions[b]
        if condition is None:
            top[0] = block.successors[0]
            if block.successors[0] == EXIT_BLOCK:
                for entry in stack:
                    entry[1] = entry[1] & ~mask
            continue
        taken = mask
        for predicate in condition:
            taken = taken & _pred(m, predicate)
        rest = mask & ~taken
        target, after = block.successors
        if target == EXIT_BLOCK:  # a guarded EXIT: its lanes leave every entry of the stack
            for entry in stack:
                entry[1] = entry[1] & ~taken
            top[0] = after
        elif not rest.any():
            top[0] = target
        elif not taken.any():
            top[0] = after
        else:
            top[0] = compiled.reconverge[b]
            stack.append([after, rest, top[0]])
            stack.append([target, taken, top[0]])
    del np
    return counts


def sample_blocks(grid: tuple[int, int, int]) -> list[tuple[tuple[int, int, int], int]]:
    """The thread blocks the executor runs for a grid, each with how many blocks of the grid it stands for. Along x
    every block of up to 3, else the first, the second (for the interior ones) and the last, so that the first and
    last tiles (edges) and interior ones are run; along y and z every block of up to 2, else the first (for all but
    the last) and the last: vitkern's kernels put channel blocks and images there, which differ only at the last."""

    def along(n: int, edges_first: bool) -> list[tuple[int, int]]:
        if n <= (3 if edges_first else 2):
            return [(i, 1) for i in range(n)]
        return [(0, 1), (1, n - 2), (n - 1, 1)] if edges_first else [(0, n - 1), (n - 1, 1)]

    return [
        ((x, y, z), wx * wy * wz)
        for z, wz in along(grid[2], False)
        for y, wy in along(grid[1], False)
        for x, wx in along(grid[0], True)
    ]


def launch_counts(function: Function, shape: LaunchShape) -> list[float]:
    """Warp executions of each basic block of the function (:func:`control_flow` order) over a launch's whole grid,
    from :func:`run_block` on the blocks :func:`sample_blocks` picks."""
    totals = [0.0] * len(function.blocks())
    for index, weight in sample_blocks(shape.grid):
        for b, count in enumerate(run_block(function, shape, index)):
            totals[b] += weight * count
    return totals
