"""GPU-only checks of the Triton kernels at Qwen-Image width (C 3072, 24 heads x 128), bf16, edit-like shape (and
Qwen-Image 2.1's merged SwiGLU at its width, 4096 -> 2 x 12288).

Each Triton forward (`triton-fused`: one kernel; `triton-gemm`: cuBLAS, then the epilogue kernel) is checked.
Contract (design.md section 1): the fused path is no further from a float64 reference than stock diffusers (+ peft
for LoRA) is from the same reference; forward and backward. Stock = separate bf16 F.linear projections, LoRA as
peft computes it (lora_B(lora_A(x)) * scale), diffusers' RMSNorm and apply_rotary_emb_qwen (complex path).
"""
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from helpers import rel_err

from qwen_fused.kernels import joint_qkv, set_backend
from qwen_fused.processor import pos_embed_hook

pytestmark = [pytest.mark.gpu, pytest.mark.kernel]
H, D, C = 24, 128, 3072
EPS = 1e-6


@pytest.fixture(autouse=True)
def _backend():
    set_backend(None)
    yield
    set_backend(None)


def _streams(s_txt, s_img, rank, dtype=torch.bfloat16, seed=0, factor_dtype=None):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt)

    streams = []
    for S in (s_txt, s_img):
        ang = torch.rand(S, D // 2, generator=g, device="cuda") * S / 7
        st = dict(x=rnd(1, S, C), weight=rnd(3 * H * D, C, scale=C ** -0.5), bias=rnd(3 * H * D, scale=0.1),
                  norm_q=(torch.rand(D, generator=g, device="cuda") + 0.5).to(dtype),
                  norm_k=(torch.rand(D, generator=g, device="cuda") + 0.5).to(dtype),
                  freqs=torch.polar(torch.ones_like(ang), ang), lora_scale=0.5)
        if rank:
            st["lora_a"] = rnd(rank, C, scale=C ** -0.5, dt=factor_dtype or dtype)
            st["lora_b"] = rnd(3 * H * D, rank, scale=0.05, dt=factor_dtype or dtype)
        streams.append(st)
    return streams


def _stock(st):
    """Stock diffusers + peft on separate q/k/v projections (merged -> standard LoRA: A shared, B split)."""
    x = st["x"]
    outs = []
    for i, norm_w in enumerate((st["norm_q"], st["norm_k"], None)):
        rows = slice(i * H * D, (i + 1) * H * D)
        t = F.linear(x, st["weight"][rows], st["bias"][rows])
        if st.get("lora_a") is not None:  # as peft: x in the factors' dtype, the sum back in the base's
            a = st["lora_a"]
            t = (t + F.linear(F.linear(x.to(a.dtype), a), st["lora_b"][rows]) * st["lora_scale"]).to(x.dtype)
        t = t.unflatten(-1, (H, D))
        if norm_w is not None:
            # diffusers' RMSNorm.forward on our weight tensor (a module would wrap it in a new leaf Parameter)
            norm = types.SimpleNamespace(eps=EPS, weight=norm_w, bias=None)
            t = apply_rotary_emb_qwen(RMSNorm.forward(norm, t), st["freqs"], use_real=False)
        outs.append(t)
    return outs


def _ref(st):
    x, w = st["x"].double(), st["weight"].double()
    y = x @ w.T + st["bias"].double()
    if st.get("lora_a") is not None:
        y = y + st["lora_scale"] * (x @ st["lora_a"].double().T) @ st["lora_b"].double().T
    q, k, v = y.unflatten(-1, (3, H, D)).unbind(2)
    rot = st["freqs"].to(torch.complex128)[None, :, None, :]

    def epi(t, nw):
        t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + EPS) * nw.double()
        return torch.view_as_real(torch.view_as_complex(t.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2)

    return [epi(q, st["norm_q"]), epi(k, st["norm_k"]), v]


def _fused(streams):
    args = []
    for st in streams:
        table = pos_embed_hook(None, (), (st["freqs"],))[0]  # [S, 2, D//2], what the blocks get
        args.append({k: v for k, v in st.items() if k != "freqs"} | dict(cos=table[:, 0], sin=table[:, 1]))
    return joint_qkv(*args, heads=H, eps=EPS)


def _cat(per_stream):
    return [torch.cat(parts, dim=1) for parts in zip(*per_stream)]


def _compare(name, ours, stock, ref, max_slack, rms_slack):
    om, orms = rel_err(ours, ref)
    sm, srms = rel_err(stock, ref)
    print(f"{name}: fused max {om:.3e} rms {orms:.3e} | stock max {sm:.3e} rms {srms:.3e}", file=sys.stderr)
    assert torch.isfinite(ours).all(), name
    assert om <= sm * max_slack and orms <= srms * rms_slack, (name, om, sm, orms, srms)


IMPLS = ["triton-fused", "triton-gemm"]


@pytest.mark.parametrize("rank", [0, 64])
@pytest.mark.parametrize("train", ["lora", "full"])
@pytest.mark.parametrize("backend", IMPLS)
def test_bf16_real_width_vs_stock(rank, train, backend):
    """Edit-like shape (S_img 4096 + S_txt 300): forward and backward no further from float64 than stock."""
    if train == "lora" and not rank:
        pytest.skip("LoRA training needs a LoRA")
    set_backend(backend)
    streams = _streams(300, 4096, rank)
    trainable = ["x", "lora_a", "lora_b"] if train == "lora" else ["x", "weight", "bias", "norm_q", "norm_k",
                                                                    "lora_a", "lora_b"]
    leaves = []
    for st in streams:
        for k in trainable:
            if st.get(k) is not None:
                st[k].requires_grad_(True)
                leaves.append((k, st[k]))
    tensors = [t for _, t in leaves]
    ours = _fused(streams)
    stock = _cat([_stock(st) for st in streams])
    ref = _cat([_ref(st) for st in streams])
    for n, o, s, r in zip("qkv", ours, stock, ref):
        # one rounding vs stock's several: never worse (5% slack on the max: the largest element's rounding)
        _compare(n, o, s, r, 1.05, 1.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    gouts = [torch.randn(o.shape, generator=g, device="cuda").to(o.dtype) for o in ours]
    g_ours = torch.autograd.grad(ours, tensors, gouts)
    g_stock = torch.autograd.grad(stock, tensors, gouts)
    g_ref = torch.autograd.grad(ref, tensors, [t.double() for t in gouts])
    for (k, _), o, s, r in zip(leaves, g_ours, g_stock, g_ref):
        # the backward GEMMs' final bf16 rounding dominates both: 10% slack
        _compare(f"grad {k}", o, s, r, 1.1, 1.1)


@pytest.mark.parametrize("backend", IMPLS)
def test_fp32_lora_factors_on_a_bf16_base(backend):
    """Mixed-precision LoRA training (fp32 factors beside bf16 weights; on Hopper the fused forward's LoRA product
    runs as tf32x3): forward and the LoRA gradients no further from float64 than peft's fp32 LoRA is."""
    set_backend(backend)
    streams = _streams(300, 4096, 32, seed=3, factor_dtype=torch.float32)
    leaves = [st[k].requires_grad_(True) for st in streams for k in ("lora_a", "lora_b")]
    ours, stock = _fused(streams), _cat([_stock(st) for st in streams])
    ref = _cat([_ref(st) for st in streams])
    for n, o, s, r in zip("qkv", ours, stock, ref):
        _compare(n, o, s, r, 1.05, 1.0)
    gouts = [torch.randn_like(o) for o in ours]
    grads = [torch.autograd.grad(outs, leaves, [t.to(outs[0].dtype) for t in gouts]) for outs in (ours, stock, ref)]
    for i, (o, s, r) in enumerate(zip(*grads)):
        _compare(f"grad {('lora_a', 'lora_b')[i % 2]}", o, s, r, 1.1, 1.1)


def test_auto_sends_unsupported_head_dim_to_torch_with_one_warning():
    set_backend("auto")
    x = torch.randn(1, 5, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3 * 2 * 48, 64, device="cuda", dtype=torch.bfloat16)
    from qwen_fused.kernels import fused_qkv, fused_qkv_torch

    with pytest.warns(RuntimeWarning, match="head_dim 48"):
        out = fused_qkv(x, w, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_qkv(x, w, heads=2)
    for a, b in zip(out, fused_qkv_torch(x, w, heads=2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,kernel", [("triton-fused", "_qkv_fwd_kernel"),
                                            ("triton-gemm", "_qkv_epilogue_kernel")])
def test_sequence_length_does_not_recompile(backend, kernel):
    """do_not_specialize on M/S/offsets: new sequence lengths reuse the compiled kernel."""
    from qwen_fused.kernels import _triton_qkv as tq

    set_backend(backend)
    kernel = getattr(tq, kernel)

    def count():
        caches = getattr(kernel, "device_caches", None) or getattr(kernel, "cache", None)
        if caches is None:
            pytest.skip("this triton version exposes no kernel cache")
        return sum(len(v[0]) if isinstance(v, tuple) else len(v) for v in caches.values())

    _fused(_streams(37, 301, 0, seed=3))
    before = count()
    for s_txt, s_img in ((5, 4096), (300, 1111), (1, 17)):
        _fused(_streams(s_txt, s_img, 0, seed=4))
    assert count() == before


def test_first_call_at_new_shape_is_quick():
    import time

    set_backend("triton")
    _fused(_streams(10, 64, 16, seed=5))  # warm (compile) this variant
    torch.cuda.synchronize()
    t = time.perf_counter()
    _fused(_streams(333, 2049, 16, seed=6))
    torch.cuda.synchronize()
    assert time.perf_counter() - t < 5.0


@pytest.mark.parametrize("rank", [0, 64])
def test_bf16_real_width_gemm_matches_fused(rank):
    """The two forwards agree within a bf16 rounding or two (gemm rounds y once more, after cuBLAS)."""
    streams = _streams(300, 4096, rank, seed=7)
    outs = {}
    for backend in IMPLS:
        set_backend(backend)
        outs[backend] = _fused(streams)
    for n, a, b in zip("qkv", *outs.values()):
        mx, rms = rel_err(a, b)
        print(f"{n}: gemm vs fused max {mx:.3e} rms {rms:.3e}", file=sys.stderr)
        assert mx <= 2 * 2 ** -8 and rms <= 2 ** -8, (n, mx, rms)


def test_tune_writes_a_table_the_dispatcher_honours(tmp_path, monkeypatch):
    """A short tuning run on this GPU: one table, valid, whose choices route the calls they were measured for."""
    from qwen_fused.kernels import dispatch, tune
    from qwen_fused.kernels.fused_qkv import route

    assert tune.main(["--out", str(tmp_path), "--rows", "512,4096", "--ranks", "0,16"]) == 0
    (path,) = tmp_path.glob("*.json")
    choices = dispatch.parse_table(__import__("json").loads(path.read_text()), path)
    assert len(choices) == 4 and path.name == f"{dispatch.slug(torch.cuda.get_device_name())}.json"
    monkeypatch.setenv(dispatch.ENV_DIR, str(tmp_path))
    dispatch.clear_cache()
    set_backend("auto")
    try:
        for e in choices:
            assert route(torch.device("cuda"), torch.bfloat16, D, e["rows"], e["rank"]) == e["impl"]
    finally:
        dispatch.clear_cache()


# ---------------------------------------------------------------------------------------------------------------
# issue 10: the eager direct route (no custom op on plain eager calls) never synchronises, and compiled models
# still trace the custom op


@pytest.mark.parametrize("route", ["direct", "op"])
@pytest.mark.parametrize("backend", IMPLS)
def test_lora_training_step_never_synchronises(backend, route, monkeypatch):
    """Forward, backward and an AdamW step of LoRA training through `joint_qkv` at real width: any host-device
    synchronisation raises under `set_sync_debug_mode("error")`."""
    fq = sys.modules["qwen_fused.kernels.fused_qkv"]
    monkeypatch.setattr(fq, "DIRECT", route == "direct")
    ops = []
    monkeypatch.setattr(fq, "_op_lists", lambda s, _f=fq._op_lists: ops.append(1) or _f(s))
    set_backend(backend)
    streams = _streams(300, 1024, 32, seed=8)
    params = []
    for st in streams:
        st["x"].requires_grad_(True)  # an upstream LoRA needs dX
        params += [st["lora_a"].requires_grad_(True), st["lora_b"].requires_grad_(True)]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        q, k, v = _fused(streams)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for st in streams:
            st["x"].grad = None

    step()  # first call: kernels compiled, optimizer state created (one-time work, allowed to synchronise)
    torch.cuda.synchronize()
    ops.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert bool(ops) == (route == "op"), "the call took the other route"
    assert all(torch.isfinite(p).all() for p in params)


def _lora_models(layers=2, heads=4, head_dim=64, r=8):
    """A builder of three models with the same bf16-exact weights and LoRA on q/k/v: fused (merged targets) in
    bf16, and stock (standard targets, A shared, B split by rows) in bf16 or float32 (the reference)."""
    import copy

    from helpers import tiny_transformer
    from peft import LoraConfig

    import qwen_fused
    from qwen_fused.names import STREAMS

    base = tiny_transformer(heads=heads, head_dim=head_dim, layers=layers).to(torch.bfloat16).float().cuda()
    C = heads * head_dim
    g = torch.Generator().manual_seed(5)
    factors = [{s: ((torch.randn(r, C, generator=g) * C ** -0.5).bfloat16().float(),
                    (torch.randn(3 * C, r, generator=g) * 0.3).bfloat16().float()) for s in STREAMS}
               for _ in range(layers)]

    def build(kind, dtype):
        m = copy.deepcopy(base)
        if kind == "fused":
            m = qwen_fused.fuse_qkv(m)
        targets = list(STREAMS) if kind == "fused" else [p for ps in STREAMS.values() for p in ps]
        m.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=targets))
        with torch.no_grad():
            for blk, fs in zip(m.transformer_blocks, factors):
                for s, parts in STREAMS.items():
                    a, b = fs[s]
                    for j, name in enumerate([s] if kind == "fused" else parts):
                        layer = getattr(blk.attn, name)
                        layer.lora_A["default"].weight.copy_(a)
                        layer.lora_B["default"].weight.copy_(b if kind == "fused" else b[j * C:(j + 1) * C])
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        return m.to(dtype)

    return build


def _merged_lora_grads(model):
    """LoRA gradients in merged naming: a stock model's q/k/v A grads summed (A is shared), B grads concatenated."""
    from qwen_fused.names import STREAMS

    out = {}
    for i, blk in enumerate(model.transformer_blocks):
        for s, parts in STREAMS.items():
            layers = [getattr(blk.attn, s)] if hasattr(blk.attn, s) else [getattr(blk.attn, p) for p in parts]
            a = [lyr.lora_A["default"].weight.grad.float() for lyr in layers]
            b = [lyr.lora_B["default"].weight.grad.float() for lyr in layers]
            out[f"{i}.{s}.lora_A"], out[f"{i}.{s}.lora_B"] = sum(a), torch.cat(b)
    return out


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fused_lora_model_matches_eager_and_stock(compiler, monkeypatch):
    """Fused blocks compiled with fullgraph=True (backend triton): the custom op in the graph, never the direct
    route; output and LoRA gradients as close to a float32 stock reference as stock bf16 is, and as eager fused."""
    from helpers import clone_inputs, tiny_inputs

    fq = sys.modules["qwen_fused.kernels.fused_qkv"]
    set_backend("triton")
    build = _lora_models()
    kw = tiny_inputs(batch=2, txt_len=7, img_shapes=((1, 4, 6), (1, 4, 4)), valid_lens=(7, 4))
    kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    g = torch.Generator(device="cuda").manual_seed(9)

    def run(model, dtype):
        inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in clone_inputs(kw).items()}
        out = model(**inputs).sample.float()
        (out * weights).sum().backward()
        return [out], _merged_lora_grads(model)

    weights = None
    ref = build("stock", torch.float32)
    with torch.no_grad():
        weights = torch.randn(ref(**clone_inputs(kw)).sample.shape, generator=g, device="cuda")
    results = {"ref": run(ref, torch.float32), "stock": run(build("stock", torch.bfloat16), torch.bfloat16),
               "eager": run(build("fused", torch.bfloat16), torch.bfloat16)}
    compiled = build("fused", torch.bfloat16)
    torch._dynamo.reset()
    for blk in compiled.transformer_blocks:
        blk.compile(fullgraph=True, backend=compiler)
    traced = []
    monkeypatch.setattr(fq, "_op_lists", lambda s, _f=fq._op_lists: traced.append(1) or _f(s))
    monkeypatch.setattr(fq, "_direct", lambda *a: pytest.fail("the compiled model took the direct route"))
    results["compiled"] = run(compiled, torch.bfloat16)
    assert traced, "the compiled blocks did not trace the custom op"
    ref_out, ref_grads = results["ref"]
    for name in ["out"] + sorted(ref_grads):
        pick = (lambda r: r[0][0]) if name == "out" else (lambda r, n=name: r[1][n])
        for ours in ("eager", "compiled"):
            _compare(f"{name} {ours}", pick(results[ours]), pick(results["stock"]), pick(results["ref"]), 1.5, 1.25)
        mx, rms = rel_err(pick(results["compiled"]), pick(results["eager"]))
        print(f"{name}: compiled vs eager fused max {mx:.3e} rms {rms:.3e}", file=sys.stderr)
        assert mx <= 2 ** -4 and rms <= 2 ** -6, (name, mx, rms)


@pytest.mark.parametrize("rank", [0, 64])
def test_swiglu_bf16_real_width_vs_stock(rank):
    """Qwen-Image 2.1's merged SwiGLU on the Triton route (4096 -> 2 x 12288, 4096 rows) against stock's bf16 MLP
    (separate gate_layer / proj, peft's LoRA on each, SiLU, product), each against float64: the output and every
    gradient (x, both weights, the LoRA factors)."""
    from qwen_fused.kernels.swiglu import swiglu

    set_backend("triton")
    c, n, m, s = 4096, 12288, 4096, 0.5
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16).requires_grad_(True)

    x, w = rnd(m, c), rnd(2 * n, c, scale=c ** -0.5)
    a, b = (rnd(2 * rank, c, scale=c ** -0.5), rnd(n, 2 * rank, scale=0.05)) if rank else (None, None)
    leaves = [t for t in (x, w, a, b) if t is not None]

    def lora_parts(dtype):  # one LoRA per part (A [r, C], B [N, r]) as peft has them, and the merged factors
        if not rank:
            return None, None, [(None, None)] * 2
        parts = [(a[:rank].to(dtype), b[:, :rank].to(dtype)), (a[rank:].to(dtype), b[:, rank:].to(dtype))]
        zero = torch.zeros(n, rank, device="cuda", dtype=dtype)
        return a.to(dtype), torch.cat([torch.cat([parts[0][1], zero], 1), torch.cat([zero, parts[1][1]], 1)]), parts

    def stock(dtype):
        xs, ws = x.to(dtype), w.to(dtype)
        _, _, parts = lora_parts(dtype)
        gate, up = [F.linear(xs, wp) + (F.linear(F.linear(xs, pa), pb) * s if pa is not None else 0)
                    for wp, (pa, pb) in zip(ws.chunk(2), parts)]
        return F.silu(gate) * up

    ma, mb, _ = lora_parts(torch.bfloat16)
    ours = swiglu(x, w, lora_a=ma, lora_b=mb, lora_scale=s)
    ref, st = stock(torch.float64), stock(torch.bfloat16)
    _compare("swiglu out", ours, st, ref, 1.05, 1.0)  # one rounding of the gate where stock has three
    dh = torch.randn(ours.shape, generator=g, device="cuda").to(torch.bfloat16)
    for t, o, sg, r in zip(leaves, torch.autograd.grad(ours, leaves, dh), torch.autograd.grad(st, leaves, dh),
                           torch.autograd.grad(ref, leaves, dh.double())):
        _compare(f"swiglu grad {tuple(t.shape)}", o, sg, r, 1.1, 1.1)
