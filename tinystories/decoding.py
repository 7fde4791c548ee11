"""The model laid out for one-token decoding steps on the CPU: the decoding copy and its step.

    fast = decoding_copy(model, torch.bfloat16)     # packed bf16 matmul weights; cached per model
    fast = decoding_copy(model, torch.int8)          # or int8 weights, one scale per output channel
    step = DecodeStep.of(fast)                       # None where the copy could not be packed
    logits = step(idx, pos, cache, key_mask)         # (B,) new tokens at (B,) positions -> (B, V)

Why (bench/generate.py, BENCHMARKS.md). At batch 1 a decode step reads every weight once for one
token, so it is bound by memory and by how well the matmul kernel streams a weight. The cached path
of `tinystories.generate` therefore runs a decoding copy of the model (`decoding_copy`). On the CPU
its Linear weights are reordered once into oneDNN's blocked layout (what torch.compile's freezing
pass does), which alone halves the time of a batch-1 matmul, and cast to `dtype`: the command picks
bf16 on CPUs that multiply bf16 natively (half the bytes to read), with inputs cast to bf16 and
outputs back to fp32 around each matmul as under autocast, so LayerNorm, attention and the KV cache
stay fp32 (PyTorch's bf16 attention kernels are several times slower at one query per row on the
CPU). The copy is cached per model and made again when a weight changes.

A one-token step of that copy then runs through `DecodeStep`: the same arithmetic as the model's
forward pass (bit for bit, tests/test_perf_paths.py), written as a flat list of tensor operations.
Going through the module tree costs a decode step about 35 operator calls and several Python calls
per block (views, transposes, casts, mask bookkeeping, nn.Module dispatch); the flat step makes
about 15 per block. A `33m` step on our 2-core CPU, alternating both ways 15 times in one process:
5.04 -> 4.34 ms at batch 1 (1.15x), 9.82 -> 8.95 ms at batch 16 (1.11x). The packed weights are also
moved onto 2 MB pages as they are made (`tinystories/hugepages.py`; 1.08x at batch 1).
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinystories.device import cpu_supports_bf16, cuda_capability, native_bf16
from tinystories.errors import UserError
from tinystories.hugepages import new_memory_on_huge_pages
from tinystories.model import rope_angles, rotate


# -----------------------------------------------------------------------------
# The decoding copy: the model's weights laid out for one-token steps


def decode_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """The weight dtype for decoding (see decode_dtype_choice)."""
    return decode_dtype_choice(device, name)[0]


def decode_dtype_choice(device: torch.device, name: str = "auto") -> tuple[torch.dtype | None, str]:
    """The weight dtype for decoding, and why: fp32, bf16, fp16 (GPUs), int8 (CPU only, see
    Int8Linear), or auto = bf16 where the hardware multiplies it natively (CPUs with AVX-512 BF16 or
    AMX, CUDA GPUs from compute capability 8.0), fp16 on older CUDA GPUs and Apple GPUs, else the
    model's own (None)."""
    asked = f"as asked (--dtype {name})"
    if name == "fp32":
        return torch.float32, asked
    if name == "bf16":
        return torch.bfloat16, asked
    if name == "fp16":
        if device.type == "cpu":
            raise UserError("--dtype fp16 decodes on GPUs (CUDA, MPS); on the CPU use bf16, int8, fp32 or auto")
        return torch.float16, asked
    if name == "int8":
        if device.type != "cpu":
            raise UserError(f"--dtype int8 decodes on the CPU only (PyTorch's fbgemm kernels); on {device.type} "
                            "use --dtype bf16, fp16 or auto, or --device cpu")
        if not int8_supported():
            raise UserError("--dtype int8 needs PyTorch's fbgemm kernels (x86 CPUs), which this PyTorch build "
                            "lacks; use --dtype bf16 or auto")
        return torch.int8, asked + ": int8 weights, one scale per output channel"
    if name != "auto":
        raise UserError(f"unknown dtype {name!r}; use auto, bf16, fp16, int8 or fp32")
    if device.type == "cpu":
        if cpu_supports_bf16():
            return torch.bfloat16, "bf16 weights, as the CPU multiplies bf16 natively (AVX-512 BF16 or AMX)"
        return None, "the CPU has no native bf16"
    if device.type == "cuda" and native_bf16(device):
        return torch.bfloat16, "bf16 weights, as the GPU multiplies bf16 natively"
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        return torch.float16, (f"fp16 weights, as this GPU (compute capability {major}.{minor}) has no native bf16, "
                               "only an emulation without tensor cores")
    return torch.float16, "fp16 weights: Apple GPUs multiply fp16 natively"


class PackedLinear(nn.Module):
    """An nn.Linear for inference whose weight, cast to `dtype`, was reordered once into oneDNN's
    blocked layout (what torch.compile's freezing pass does, without the compile time).

    Inputs are cast to `dtype` and outputs back, as autocast does: with dtype bf16 the matmuls read
    half the bytes while everything between them (LayerNorm, attention, the KV cache) stays fp32.
    At fp32 the result equals F.linear's up to the order of summation.

    `gelu=True` applies the tanh GELU inside the matmul (a oneDNN post-op, on the fp32 accumulator)
    and returns the result in `dtype`, to be fed straight to the next PackedLinear (see PackedMLP).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        # batch_size=1: the layout for one-token steps, which also served batch 16 best (measured)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), 1)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.gelu = gelu

    def matmul(self, x: Tensor) -> Tensor:
        """The result in `dtype` (with the GELU where `gelu`): one op besides the input's cast."""
        post, algorithm = ("gelu", "tanh") if self.gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, post, [], algorithm)

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x) if self.gelu else self.matmul(x).to(x.dtype)


def int8_supported() -> bool:
    """True where this PyTorch build has the fbgemm kernels that Int8Linear runs on (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def _has_vnni() -> bool:
    """True where the CPU has int8 dot products that accumulate in int32 (AVX-512 VNNI, AVX-VNNI)."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per output channel (row): weight ≈ q * scale[:, None].

    q (N, K) int8 in [-127, 127] (no -128, so that q and -q both fit), scale (N,) fp32 = the row's
    largest |w| / 127: every weight is off by at most scale / 2 (tests/test_perf_paths.py).
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """An nn.Linear for inference with int8 weights (`quantize_per_channel`): half the bytes of
    bf16 to stream at every decode step, and a `33m` that fits in a 32 MB L3 cache (30 MB).

    The matmul is PyTorch's dynamic quantized linear for x86 CPUs (fbgemm's `linear_dynamic`, no
    compiler needed): each call quantizes its input to uint8 with one scale and zero point taken
    from the input's range, multiplies integers with int32 accumulation, and rescales to fp32 with
    the bias added. Input and output are fp32, so everything between the matmuls stays as with bf16
    weights. Chosen over weight-only int8 (`aten._weight_int8pack_mm`: bf16 inputs, as fast at the
    blocks' matmuls but half as fast at the 50,257-row output layer and five times slower than bf16
    at a prefill's many rows) and oneDNN's int8 linear (slower at one row); measured in
    BENCHMARKS.md, with what it costs in loss.

    One input scale per call means the rows of a batch share it: a row's result depends a little on
    the other rows (a story written alone or beside others, or in `serve` beside other requests, can
    part after a near-tie), unlike bf16 and fp32, whose rows are independent. Per-row scales are not
    in fbgemm's API.

    `gelu=True` applies the tanh GELU to the output (fbgemm has no fused one), as PackedLinear.
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu = gelu
        q, scale = quantize_per_channel(linear.weight)
        zero = torch.zeros(len(scale), dtype=torch.long)
        bias = None if linear.bias is None else linear.bias.detach().float()
        engine = torch.backends.quantized.engine
        try:
            with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao, not gone
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
                torch.backends.quantized.engine = "fbgemm"  # the packed weight is the engine's own
                self.packed = torch.ops.quantized.linear_prepack(weight, bias)
        finally:
            torch.backends.quantized.engine = engine
        # Without VNNI, x86 kernels add pairs of uint8 x int8 products in int16, which 8-bit inputs
        # can saturate: there inputs get 7 bits (fbgemm's advice). VNNI adds them in int32.
        self.reduce_range = not _has_vnni()

    def matmul(self, x: Tensor) -> Tensor:
        """The fp32 result (with the GELU where `gelu`), for x (..., in_features) in fp32."""
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features), self.packed, self.reduce_range)
        y = y.view(*x.shape[:-1], self.out_features)
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x.float()).to(x.dtype)


def packed_linear(linear: nn.Linear, dtype: torch.dtype, gelu: bool = False) -> "PackedLinear | Int8Linear":
    """The layer laid out for decoding in `dtype`: Int8Linear for torch.int8, else PackedLinear."""
    return Int8Linear(linear, gelu) if dtype == torch.int8 else PackedLinear(linear, dtype, gelu)


class PackedMLP(nn.Module):
    """A block's MLP in a decoding copy: c_fc's output goes to c_proj in the weights' dtype (as
    under autocast) instead of a round trip through fp32; a GELU is fused into c_fc's matmul; dropout
    is off in eval. Two fewer ops and two fewer casts per block on every decode step. (With int8
    weights the hidden activations are fp32, what Int8Linear takes and gives.)"""

    def __init__(self, mlp: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.kind = mlp.kind
        self.c_fc = packed_linear(mlp.c_fc, dtype, gelu=self.kind == "gelu")
        self.c_proj = packed_linear(mlp.c_proj, dtype)

    def hidden(self, x: Tensor) -> Tensor:
        """The activations c_proj takes, in the weights' dtype (the model's MLP.forward, packed)."""
        if self.kind == "gelu":
            return self.c_fc.matmul(x)  # the GELU is inside the matmul
        h = self.c_fc.matmul(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.relu(h).square()  # relu2

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj.matmul(self.hidden(x)).to(x.dtype)


def pack_linears(model: nn.Module, dtype: torch.dtype) -> bool:
    """Swap every block's MLP of a CPU `model` for a PackedMLP and every other nn.Linear for a
    PackedLinear (Int8Linear for torch.int8), in place; False (and nothing swapped) where this
    PyTorch build cannot, or its results are not F.linear's and F.gelu's."""
    from tinystories.model import MLP

    mlps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, MLP)]
    in_mlps = {id(m) for _, _, mlp in mlps for m in mlp.modules()}
    linears = [(parent, name, child) for parent in model.modules() if id(parent) not in in_mlps
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not linears or linears[0][2].weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops (the ones inductor uses): check them on this build before relying on them
        packed = [packed_linear(linear, dtype) for _, _, linear in linears]
        fused = [PackedMLP(mlp, dtype) for _, _, mlp in mlps]
        probes = [(linears[0][2], packed[0])] + ([(mlps[0][2], fused[0])] if mlps else [])
        for reference, new in probes:
            width = new.c_fc.in_features if isinstance(new, PackedMLP) else new.in_features
            x = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(next(reference.parameters()).dtype)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
                expected = reference(x).float()  # what autocast computes, or plain fp32 (int8 too)
            got = new(x)
            # int8 rounds inputs and weights to 8 bits, twice in a SwiGLU product: a few % of the
            # largest output on random inputs. This catches a broken kernel, not rounding (what
            # rounding costs in loss is measured, BENCHMARKS.md).
            tolerance = (0.1 if dtype == torch.int8 else 2e-2) * expected.abs().max().item()
            if got.dtype != x.dtype or not torch.allclose(got.float(), expected, rtol=2e-2, atol=tolerance):
                return False
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    for (parent, name, _), new in zip(linears + mlps, packed + fused):
        setattr(parent, name, new)  # a tied lm_head gets its own packed copy; wte stays the embedding
    return True


def _version(t: Tensor) -> int:
    """How often `t` was changed in place; inference tensors (made under inference_mode) keep no count."""
    try:
        return t._version
    except RuntimeError:
        return -1


# model -> (what it was made from, the copy); weak, so a model's copy goes when the model does
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_copy(model, dtype: torch.dtype | None = None):
    """The model as the cached decoder runs it, with matmul weights in `dtype` (None: the model's).

    On the CPU: a copy whose Linear layers are PackedLinear in `dtype` (Int8Linear for torch.int8)
    and everything else as in the model (bf16 attention kernels are slow at one query per row, and
    fp32 keeps the KV cache exact). Elsewhere: the model itself, or a copy cast to `dtype`. Made
    once per model and dtype, and again whenever a weight of `model` changed since (its version
    counter tells).
    """
    weight = model.transformer.wte.weight
    dtype = dtype or weight.dtype
    if weight.device.type != "cpu" and dtype == weight.dtype:
        return model
    made_from = (dtype, tuple((p.data_ptr(), _version(p)) for p in model.parameters()))
    cached = _COPIES.get(model)
    if cached is not None and cached[0] == made_from:
        return cached[1]
    _COPIES.pop(model, None)  # free the stale copy before making the next
    with torch.no_grad():
        fast = copy.deepcopy(model).eval().requires_grad_(False)
        with new_memory_on_huge_pages():  # the packed weights, streamed at every step (hugepages.py)
            packed = pack_linears(fast, dtype)
        if not packed:
            if dtype == torch.int8:
                raise UserError("int8 decoding needs the model on a CPU and PyTorch's fbgemm kernels, which "
                                "failed their check here; use --dtype bf16 or auto")
            if dtype == weight.dtype:
                return model  # nothing to gain from a copy (and the cache must not hold the model)
            fast = fast.to(dtype)
    _COPIES[model] = (made_from, fast)
    return fast


# -----------------------------------------------------------------------------
# One decode step without the module tree


class DecodeStep:
    """One-token decode steps of a packed decoding copy: `step(idx, pos, cache, key_mask)`.

    idx, pos:  (B,) the new token of each row and its position.
    cache:     the copy's KVCache holding `cache.length` positions; the new keys/values go at
               index `cache.length`, which then grows by one.
    key_mask:  (B, >= cache.length + 1) bool, False on padding keys, or None when no row is padded.
    Returns the fp32 logits (B, V) after the new token, as `model(idx[:, None], kv_cache=cache,
    pos=pos[:, None], key_mask=key_mask)[0][:, -1]` would, bit for bit.

    A one-token step needs no causal mask (the new token may see every cached key), and a local
    (GPT-Neo) layer's band is a slice: it sees the last `window_size` keys, itself included (equal
    to the model's band mask up to the order of summation).
    """

    @classmethod
    def of(cls, model) -> "DecodeStep | None":
        """The step of a decoding copy, or None where its Linear layers are not packed."""
        blocks, linears = model.transformer.h, (PackedLinear, Int8Linear)
        packed = isinstance(model.lm_head, linears) and all(
            isinstance(b.attn.c_attn, linears) and isinstance(b.attn.c_proj, linears)
            and isinstance(b.mlp, PackedMLP) for b in blocks)
        return cls(model) if packed else None

    def __init__(self, model):
        config = model.config
        self.n_head, self.head_dim, self.C = config.n_head, config.head_dim, config.n_embd
        self.wte = model.transformer.wte.weight
        self.wpe = model.transformer.wpe.weight if "wpe" in model.transformer else None  # None: RoPE
        self.rope_theta = config.rope_theta
        self.ln_f = model.transformer.ln_f
        self.lm_head = model.lm_head
        # per layer: its modules, its attention scale, and how many keys it may see (None: all)
        self.layers = [(b.ln_1, b.attn.c_attn, getattr(b.attn, "q_norm", None), getattr(b.attn, "k_norm", None),
                        b.attn.c_proj, b.attn.scale, b.ln_2, b.mlp, config.window_size if config.is_local(i) else None)
                       for i, b in enumerate(model.transformer.h)]

    def __call__(self, idx: Tensor, pos: Tensor, cache, key_mask: Tensor | None = None) -> Tensor:
        B, C, H, D = idx.shape[0], self.C, self.n_head, self.head_dim
        L = cache.length  # tokens before the new one
        slot, keys = L % cache.max_len, min(L + 1, cache.max_len)  # a full cache is a ring (RoPE)
        x = F.embedding(idx, self.wte)  # (B, C)
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe)
        else:
            rope = rope_angles(pos[:, None], D, self.rope_theta)  # cos, sin: (B, 1, 1, head_dim)
        for i, (ln_1, c_attn, q_norm, k_norm, c_proj, scale, ln_2, mlp, window) in enumerate(self.layers):
            h = _norm(x, ln_1)
            qkv = c_attn.matmul(h).float()  # (B, 3C), as the module's fp32 output
            q, k = qkv[:, :C].view(B, H, 1, D), qkv[:, C : 2 * C].view(B, H, 1, D)  # (B, n_head, 1, head_dim)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            if self.wpe is None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            cache.k[i, :, :, slot] = k[:, :, 0]
            cache.v[i, :, :, slot] = qkv[:, 2 * C :].view(B, H, D)
            first = 0 if window is None else max(0, L + 1 - window)  # local layers never fill the ring
            mask = None if key_mask is None else key_mask[:, None, None, first:keys]  # (B, 1, 1, keys)
            y = F.scaled_dot_product_attention(
                q, cache.k[i, :, :, first:keys], cache.v[i, :, :, first:keys],  # (B, n_head, keys, head_dim)
                attn_mask=mask, scale=scale,
            )
            x = x + c_proj.matmul(y.view(B, C))  # (B, n_head, 1, head_dim) is (B, C) in memory
            h = _norm(x, ln_2)
            x = x + mlp.c_proj.matmul(mlp.hidden(h))  # (a GELU is inside c_fc's matmul); adds in fp32
        cache.length = L + 1
        return self.lm_head.matmul(_norm(x, self.ln_f)).float()


def _norm(x: Tensor, module: nn.Module) -> Tensor:
    """A block's LayerNorm or RMSNorm as one functional call."""
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)

