"""Benchmark cases: one workload each (level, named shape, batch, mode, LoRA rank, checkpointing, blocks).

Levels
  op     the QKV stage of one block: both streams' projections + QK RMSNorm + RoPE + joint [text; image] layout
  block  one full QwenImageTransformerBlock
  model  the whole transformer with N blocks (embedders, blocks, output head; bench/model_level.py); a training
         step there includes the AdamW step on the LoRA parameters
Modes
  fwd     inference (no grad, no LoRA)
  fwdbwd  LoRA training step: forward + backward, base weights frozen, LoRA on the seed's default targets
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

# named shapes: (S_img, S_txt)
SHAPES = {
    "t2i-1328": (6889, 256),
    "edit-1024": (8192, 1024),
    "edit-1024x2": (12288, 600),
    "train-512": (2048, 400),
}
# Qwen-Image 2.1 (issue 20; a `q21-` prefix names the family): latent images (frame, h, w), condition images
# first, the target last; one latent token is 16x16 pixels (2.1's VAE is 16x and its transformer unpatched), so a
# 1024x1024 image is 64x64 = 4096 tokens, and its 2x2 groups fill 1024 image slots of the text stream (Qwen3-VL's
# 32x32-pixel merged patches: `pipeline_qwenimage21.py`, `_IMG_TOKENS_PER_SLOT`). `text` is the prompt runs
# around the condition images (before, after each): the template's few tokens, then a prompt; 128 text tokens is
# an assumed prompt length, not one read off a pipeline run.
SHAPES21 = {
    "q21-edit-1024": dict(text=(8, 120), images=((1, 64, 64), (1, 64, 64))),
    "q21-train-512": dict(text=(8, 120), images=((1, 32, 32), (1, 32, 32))),
}
# (S_img, S_txt) as for Qwen-Image: latent tokens, text tokens (the joint sequence is S_img + S_txt)
SHAPES.update({k: (sum(f * h * w for f, h, w in v["images"]), sum(v["text"])) for k, v in SHAPES21.items()})
REAL_DIMS = dict(heads=24, head_dim=128)
TINY_DIMS = dict(heads=2, head_dim=32)
TINY_SEQ_DIV = 64  # reduced sizes without CUDA: sequence lengths divided by this
FULL_MODEL_BLOCKS = 60

QUICK_CASES = ["op/edit-1024/b1/fwd", "op/edit-1024/b1/fwdbwd-r64", "block/edit-1024/b1/fwd",
               "block/train-512/b1/fwdbwd-r32"]
# `--quick` runs these too: the whole model as users run it (issue 11), inference and a LoRA training step with
# AdamW. Kept apart because the pytest-benchmark suite (bench/test_bench_suite.py) takes QUICK_CASES through the
# per-case `Workload`, which a 60-block model does not fit (it holds a reference-precision copy).
QUICK_MODEL_CASES = ["model/edit-1024/b1/fwd/n60", "model/train-512/b1/fwdbwd-r32-gc/n60"]
# Qwen-Image 2.1 (issue 20): op and block as the quick ones, the model at 32 blocks, inference and a LoRA training
# step on the 1024x1024 edit (bench/family21.py); not in `--quick`, pass them to `--cases`
Q21_CASES = ["op/q21-edit-1024/b1/fwd", "op/q21-train-512/b1/fwdbwd-r64", "block/q21-edit-1024/b1/fwd",
             "block/q21-train-512/b1/fwdbwd-r32", "model/q21-edit-1024/b1/fwd/n32",
             "model/q21-edit-1024/b1/fwdbwd-r32-gc/n32"]


@dataclass(frozen=True)
class Case:
    level: str            # op | block | model
    shape: str            # key of SHAPES
    batch: int = 1
    mode: str = "fwd"     # fwd | fwdbwd
    rank: int = 0         # LoRA rank (fwdbwd only)
    gc: bool = False      # gradient checkpointing per block (block/model fwdbwd)
    blocks: int = 1       # blocks run in sequence (model level)

    @property
    def family(self) -> str:
        """The model family's NAME (qwen_fused/families): "qwenimage21" for the `q21-` shapes."""
        return "qwenimage21" if self.shape in SHAPES21 else "qwenimage"

    @property
    def name(self) -> str:
        mode = self.mode + (f"-r{self.rank}" if self.rank else "") + ("-gc" if self.gc else "")
        tail = f"/n{self.blocks}" if self.level == "model" else ""
        return f"{self.level}/{self.shape}/b{self.batch}/{mode}{tail}"

    @classmethod
    def parse(cls, name: str, blocks: int = 4) -> "Case":
        m = re.fullmatch(r"(op|block|model)/([\w.-]+?)/b(\d+)/(fwd|fwdbwd)(?:-r(\d+))?(-gc)?(?:/n(\d+))?", name)
        if not m or m.group(2) not in SHAPES:
            raise ValueError(f"cannot parse case {name!r}; expected LEVEL/SHAPE/bN/MODE[-rR][-gc][/nN] with SHAPE "
                             f"one of {', '.join(SHAPES)}, e.g. {QUICK_CASES[1]}")
        level, shape, b, mode, r, gc, n = m.groups()
        if mode == "fwdbwd" and not r:
            raise ValueError(f"case {name!r}: fwdbwd needs a LoRA rank, e.g. fwdbwd-r32")
        if level == "op" and gc:
            raise ValueError(f"case {name!r}: checkpointing applies to block and model levels")
        if mode == "fwd" and (r or gc):
            raise ValueError(f"case {name!r}: fwd is inference without LoRA or checkpointing")
        return cls(level, shape, int(b), mode, int(r or 0), bool(gc),
                   int(n) if n else (blocks if level == "model" else 1))


def block_cost(c: Case, lin, att, weights, acts) -> dict:
    """FLOPs and bytes of a block or model case from one block's forward parts (GEMM and attention FLOPs, weight
    and activation bytes): the backward counts the dX GEMMs (frozen weights) and flash-attention's backward
    (~2.5x its forward), plus the recomputed forward under gradient checkpointing; times the case's blocks."""
    if c.mode == "fwd":
        flops, nbytes = lin + att, weights + acts
    else:
        flops = 2 * lin + 3.5 * att + ((lin + att) if c.gc else 0)
        nbytes = (3 if c.gc else 2) * weights + 2 * acts
    return {"flops": int(flops * c.blocks), "bytes": int(nbytes * c.blocks)}


def all_cases(blocks: int = 4) -> list[Case]:
    """The full registry: every level x shape x batch x mode (x rank x checkpointing for training)."""
    out = []
    for level in ("op", "block", "model"):
        n = blocks if level == "model" else 1
        for shape in SHAPES:
            for batch in (1, 2):
                out.append(Case(level, shape, batch, "fwd", blocks=n))
                for rank in (32, 64):
                    for gc in ((False,) if level == "op" else (False, True)):
                        out.append(Case(level, shape, batch, "fwdbwd", rank, gc, n))
    return out


def select_cases(patterns=None, level=None, mode=None, quick=False, blocks=4) -> list[Case]:
    """Cases by name or glob (`--cases`), narrowed by `--level` / `--mode`; `quick` = the quick subset."""
    if quick and not patterns:
        patterns = QUICK_CASES + QUICK_MODEL_CASES
    registry = all_cases(blocks)
    if patterns:
        cases = []
        for pat in patterns:
            if any(ch in pat for ch in "*?["):
                hits = [c for c in registry if fnmatch.fnmatch(c.name, pat)]
                if not hits:
                    raise ValueError(f"--cases pattern {pat!r} matches no case")
                cases += hits
            else:
                cases.append(Case.parse(pat, blocks))
    else:
        cases = registry
    cases = [c for c in cases if (not level or c.level in level) and (not mode or c.mode in mode)]
    seen = set()
    return [c for c in cases if not (c.name in seen or seen.add(c.name))]
