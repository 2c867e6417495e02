"""Model-level cases: the whole transformer as users run it (embedders, N blocks, output head).

One bf16 model is built once (parameters on the meta device, then materialised in place: no fp32 copy, since 60
real blocks are 41 GB). Stock runs first (eager, and under diffusers' `compile_repeated_blocks`), then the same
model is fused in place and ours runs. Training cases give stock a peft LoRA with its own A for q, k and v (what a
stock LoRA is) and ours the same LoRA through `qwen_fused.load_lora`, from the state dict saved off stock's adapter
(on the fused model it becomes block-diagonal): each side runs what a user would. A training step is forward,
backward and an AdamW step on the LoRA parameters.

Before anything is timed, every provider is verified on a small model (`VERIFY_BLOCKS` blocks at the case's width
and sequence lengths) against a copy at reference precision: the full model cannot have one. Timed repeats of the
providers that share a model state are interleaved (`interleaved`), so drift hits all of them alike.
"""
from __future__ import annotations

import copy
import gc
import math
import statistics
import time

import torch

from qwen_fused.families import FAMILIES
from qwen_fused.names import STREAMS
from qwen_fused.tiny import random_transformer, rope_axes

from .cases import REAL_DIMS, SHAPES, TINY_DIMS, TINY_SEQ_DIV, Case
from .providers import Unavailable, use_backend, use_backend_reset
from .workloads import STOCK_LORA_TARGETS

# merged LoRA target (module leaf) -> its stock parts in row order: q/k/v, and the families' opt-in merges (2.1's
# `gate_up` = gate_layer, proj)
SPLITS = {**STREAMS, **{m.rsplit(".", 1)[1]: tuple(p.rsplit(".", 1)[1] for p in parts) for f in FAMILIES
                        for m, (parts, _) in getattr(f, "MERGED_LINEARS", {}).items()}}
VERIFY_BLOCKS = 2
TINY_MAX_BLOCKS = 3        # without CUDA: at most this many (tiny) blocks
N_IMAGES = {"t2i-1328": 1, "edit-1024": 2, "edit-1024x2": 3, "train-512": 2}  # target + condition images
STOCK_GROUP = ("stock", "stock-compile")                      # run on the stock model
OURS_GROUP = ("ours-triton", "ours-torch", "ours-compile")   # run on the same model, fused in place
BLOCKS_GROUP = ("ours-blocks", "ours-blocks-compile")         # then with `fuse_blocks` on top (2.1: fuse_swiglu)
BACKEND = {"stock": None, "stock-compile": None, "ours-triton": "triton", "ours-torch": "torch",
           "ours-compile": "auto", "ours-blocks": "auto", "ours-blocks-compile": "auto", "ours-swiglu": "auto",
           "ours-swiglu-compile": "auto"}


def repeats(cuda: bool, quick: bool) -> int:
    """Timed samples per provider (explicit: one sample of a 0.4 s step is not a median)."""
    return 3 if not cuda else (5 if quick else 10)


def interleaved(names, reps):
    """Sample order: rounds over `names`, every other round reversed (a b c c b a ...), so that both a drift
    and a provider's position after another cost every provider alike."""
    return [n for r in range(reps) for n in (names if r % 2 == 0 else names[::-1])]


# ------------------------------------------------------------------------------------------ model and inputs
class Setup:
    """Sizes of a model case (tiny without CUDA) and its inputs. Qwen-Image's; `family21.Setup21` is 2.1's."""

    lora_targets = STOCK_LORA_TARGETS
    extra_group = BLOCKS_GROUP  # the providers after ours, on the model with `fuse_extra` on top

    def __init__(self, case: Case, device, tiny: bool, blocks: int, seed=0, dtype=torch.bfloat16):
        self.case, self.device, self.tiny, self.blocks, self.dtype = case, torch.device(device), tiny, blocks, dtype
        dims = TINY_DIMS if tiny else REAL_DIMS
        self.heads, self.head_dim = dims["heads"], dims["head_dim"]
        self.dim = self.heads * self.head_dim
        s_img, s_txt = SHAPES[case.shape]
        div = TINY_SEQ_DIV if tiny else 1
        n = N_IMAGES[case.shape]
        side = math.isqrt(s_img // div // n)  # equal square latents; t2i-1328 is 83 x 83 exactly
        self.img_shapes = [[(1, side, side)] * n] * case.batch
        self.s_img, self.s_txt = n * side * side, max(1, s_txt // div)
        self.in_channels, self.joint_dim = (16, 16) if tiny else (64, 3584)
        self.train = case.mode == "fwdbwd"
        g = torch.Generator(device=self.device).manual_seed(seed + 2)
        B = case.batch

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=self.device, dtype=dtype)
        self.inputs = dict(hidden_states=rnd(B, self.s_img, self.in_channels),
                           encoder_hidden_states=rnd(B, self.s_txt, self.joint_dim),
                           timestep=torch.full((B,), 0.5, device=self.device, dtype=dtype),
                           img_shapes=self.img_shapes, return_dict=False)
        self.grad_out = rnd(B, self.s_img, self.in_channels)  # d(loss)/d(output): a fixed direction

    def build(self, n_layers, seed=0):
        """The bf16 model with random weights (materialised in place: no fp32 copy of the full model)."""
        d = self.head_dim
        return random_transformer(seed, dtype=self.dtype, device=self.device, in_channels=self.in_channels,
                                  out_channels=self.in_channels // 4, num_layers=n_layers, attention_head_dim=d,
                                  num_attention_heads=self.heads, joint_attention_dim=self.joint_dim,
                                  axes_dims_rope=rope_axes(d)).requires_grad_(False)

    def model(self, n_layers, seed=0):
        """The case's stock model: training cases with the stock LoRA and, for -gc, diffusers' checkpointing."""
        model = self.build(n_layers, seed)
        if self.train:
            self.add_stock_lora(model, seed)
            if self.case.gc:
                model.enable_gradient_checkpointing()
        return model

    def add_stock_lora(self, model, seed=0):
        """peft LoRA on the seed's targets, q, k and v each with its own A (and B nonzero, so the path is live)."""
        from peft import LoraConfig

        r = self.case.rank
        model.add_adapter(LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=self.lora_targets))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    std = p.shape[1] ** -0.5 if ".lora_A." in name else 0.5 * r ** -0.5
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return model

    @staticmethod
    def fuse_extra(model, lora=None):
        """The fusing on top of ours for `extra_group` (its LoRA, loaded by ours, stays on)."""
        import qwen_fused

        return qwen_fused.fuse_blocks(model)


def make_setup(case: Case, device, tiny: bool, blocks: int, seed=0, dtype=torch.bfloat16):
    """The case's family's Setup."""
    if case.family == "qwenimage21":
        from .family21 import Setup21

        return Setup21(case, device, tiny, blocks, seed, dtype)
    return Setup(case, device, tiny, blocks, seed, dtype)


def stock_view(named: dict, rank: int) -> dict:
    """LoRA tensors (weights or gradients) in stock naming: a merged q/k/v adapter of rank 3r with block-diagonal
    B (what `load_lora` makes of a standard LoRA) is split back into its q, k and v parts (2.1's merged `gate_up`,
    rank 2r, into gate_layer and proj)."""
    out = {}
    for name, t in named.items():
        head, leaf, tail = _split_lora_name(name)
        if leaf not in SPLITS:
            out[name] = t
            continue
        parts = SPLITS[leaf]
        for i, part in enumerate(parts):
            rows = slice(i * rank, (i + 1) * rank)
            if ".lora_A." in tail:
                blk = t[rows]
            else:
                n = t.shape[0] // len(parts)
                blk = t[i * n:(i + 1) * n, rows]
            out[f"{head}.{part}{tail}"] = blk
    return out


def _split_lora_name(name):
    pre, _, tail = name.partition(".lora_")
    head, _, leaf = pre.rpartition(".")
    return head, leaf, ".lora_" + tail


def lora_tensors(model, grads=False):
    """Trainable tensors by name, or their gradients (the last block's text-stream output feeds nothing: None)."""
    out = {n: (p.grad if grads else p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in out.items() if t is not None}


# ------------------------------------------------------------------------------------------------ providers
class Runner:
    """Runs one provider's unit of work on a model: inference, or a LoRA training step with AdamW."""

    def __init__(self, setup: Setup, model, dtype=None):
        self.s, self.model = setup, model
        self.dtype = dtype or setup.dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if setup.train else None
        self.compiled = {}

    def _inputs(self):
        return {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in self.s.inputs.items()}

    def forward_backward(self):
        """Output, and (training) the LoRA gradients of <output, grad_out>, without the optimizer step."""
        if not self.s.train:
            with torch.no_grad():
                return self.model(**self._inputs())[0]
        out = self.model(**self._inputs())[0]
        (out.float() * self.s.grad_out.float()).sum().backward()
        return out

    def step(self):
        out = self.forward_backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return out

    def collect(self, rank):
        for p in self.model.parameters():
            p.grad = None
        res = {"out": self.forward_backward().detach()}
        if self.s.train:
            res.update({f"grad.{k}": g for k, g in stock_view(lora_tensors(self.model, grads=True), rank).items()})
            for p in self.model.parameters():
                p.grad = None
        return res

    # regional compilation is a state of the blocks: keep the compiled callables and switch them on or off
    def compile(self):
        # fullgraph, as `qwen-fused train/edit --compile` runs: a graph break is a bug to see, not to time
        self.model.compile_repeated_blocks(fullgraph=True)
        self.compiled = {b: b._compiled_call_impl for b in self.model.transformer_blocks}

    def use(self, name):
        compiled = name.endswith("-compile")
        if compiled and not self.compiled:
            self.compile()
        for b in self.model.transformer_blocks:
            b._compiled_call_impl = self.compiled.get(b) if compiled else None
        use_backend(BACKEND[name])

    def uncompile(self):
        for b in self.model.transformer_blocks:
            b._compiled_call_impl = None
        self.compiled = {}


def fuse_keeping_lora(model, fuse, lora=None):
    """`fuse(model)` with the training LoRA (`lora`: its peft state dict, already unloaded) put back through
    `qwen_fused.load_lora`, which maps stock's part names onto the merged projections; only the LoRA trains."""
    import qwen_fused

    fuse(model)
    if lora is not None:
        qwen_fused.load_lora(model, lora)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    return model


def groups(setup: Setup, model, providers):
    """(provider names, Runner) for stock, then for ours on the same model fused in place (LoRA reloaded from
    the state dict of stock's adapter), then for ours with `fuse_blocks` too. A generator: the model changes
    between the groups."""
    import qwen_fused
    from peft.utils import get_peft_model_state_dict

    stock = [p for p in STOCK_GROUP if p in providers]
    ours = [p for p in OURS_GROUP if p in providers]
    run = Runner(setup, model)
    yield stock, run
    run.uncompile()  # ours compiles its own (fused) blocks; the stock graphs stay cached for the next model
    lora = None
    if setup.train:
        lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        model.unload_lora()
    fuse_keeping_lora(model, qwen_fused.fuse_qkv, lora)
    run = Runner(setup, model)
    yield ours, run
    blocks = [p for p in setup.extra_group if p in providers]
    if blocks:
        run.uncompile()
        setup.fuse_extra(model, lora)
        yield blocks, Runner(setup, model)


# --------------------------------------------------------------------------------------------------- a case
def run_model_case(case: Case, providers, device, tiny, quick, seed, res, judge, compare, log, prefix="",
                   on_group=None):
    """Fill `res["providers"]`: verify every provider on a small model, then time them on the full one;
    `on_group()` after each group of providers is timed (a run cut later in the case keeps those)."""
    cuda = torch.device(device).type == "cuda"
    blocks = min(case.blocks, TINY_MAX_BLOCKS) if tiny else case.blocks
    setup = make_setup(case, device, tiny, blocks, seed)
    res.update(blocks_run=blocks, s_img=setup.s_img, s_txt=setup.s_txt, dim=setup.dim, heads=setup.heads,
               img_shapes=setup.img_shapes[0], repeats=repeats(cuda, quick), verify_blocks=VERIFY_BLOCKS)
    provs = res["providers"]
    for name in providers:
        provs[name] = {}
        if name not in BACKEND:
            provs[name].update(status="unavailable", reason="not a model-level provider")
        elif name == "ours-triton" and not cuda:
            provs[name].update(status="unavailable", reason="the Triton backend needs a CUDA device")

    log(f"{prefix}{case.name}: verifying on {VERIFY_BLOCKS} blocks")
    _verify(setup, providers, provs, judge, compare, seed)
    ok = [n for n in providers if provs[n].get("status") == "ok"]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the verification models are gone before the full one is built
    log(f"{prefix}{case.name}: building {blocks} blocks (bf16, random weights)")
    model = setup.model(blocks, seed)
    for names, run in groups(setup, model, ok):
        _time_group(run, [n for n in names if n in ok], provs, res["repeats"], cuda, log, prefix + case.name)
        if on_group:
            on_group()
    use_backend_reset()
    if not cuda:
        for p in provs.values():
            if "ms" in p:
                p["peak_extra_mb"] = None  # CPU: not measured


def _verify(setup, providers, provs, judge, compare, seed):
    small = setup.model(VERIFY_BLOCKS, seed)
    rank = setup.case.rank
    ref_dtype = torch.float32 if setup.device.type == "cuda" else torch.float64
    # torch's Module.to: diffusers' own warns that a model built in code should be cast by from_pretrained
    ref_model = torch.nn.Module.to(copy.deepcopy(small), ref_dtype)
    ref = Runner(setup, ref_model, dtype=ref_dtype).collect(rank)
    del ref_model
    stock_errs = None
    for names, run in groups(setup, small, [p for p in providers if "status" not in provs[p]]):
        for name in names:
            try:
                run.use(name)
                errs = compare(run.collect(rank), ref)
                stock_errs = stock_errs or (errs if name == "stock" else None)
                if stock_errs is None:
                    raise Unavailable("stock eager did not verify, so there is nothing to verify against")
                good, why = judge(errs, stock_errs)
                provs[name].update(errors=errs, max_err=max(errs.values()), status="ok" if good else "wrong",
                                   **({} if good else {"reason": why}))
            except Unavailable as e:
                provs[name].update(status="unavailable", reason=str(e))
            except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
                provs[name].update(status="error", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    use_backend_reset()


def _time_group(run, names, provs, reps, cuda, log, label):
    """First call (compile), a warm call that records peak memory, then the interleaved timed samples."""
    def once(name):
        run.use(name)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    live = []
    for name in names:
        try:
            provs[name]["first_call_s"] = once(name)  # compiles (forward and backward) for -compile
            if cuda:  # the second call is warm: its peak is the step's
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            once(name)
            if cuda:
                provs[name]["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            live.append(name)
        except Exception as e:  # noqa: BLE001
            provs[name].update(status="error", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    samples = {n: [] for n in live}
    for name in interleaved(live, reps):
        samples[name].append(once(name) * 1e3)
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=10, method="inclusive")
        provs[name].update(ms=statistics.median(ts), p20=q[1], p80=q[7], samples_ms=ts)
        log(f"{label}: {name:14s} {provs[name]['ms']:9.3f} ms [{q[1]:.3f}-{q[7]:.3f}] over {len(ts)} samples")
