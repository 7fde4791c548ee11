"""Cross-entropy over a large vocabulary, without the full-size fp32 copies of the logits.

    loss = cross_entropy(logits, targets)   # (N, V) any float dtype, (N,) int64; -1 = ignored

The same number as `F.cross_entropy(logits.float(), targets, ignore_index=-1)` (the mean over the
targets that are not -1), computed in fp32, but row chunk by row chunk. Why: at vocab 50,257 and
batch 8 x 256 the logits are 2,048 x 50,257 = 103M numbers. The plain path makes an fp32 copy of
them, a log-softmax of that copy, the gradient of the log-softmax and the gradient of the copy: four
more tensors of 411 MB each. On a CPU every one is a fresh allocation the kernel maps page by page,
and that, not arithmetic, dominated our training step (see BENCHMARKS.md). Here each chunk of rows
is widened to fp32 while it is in cache; the only full-size tensor made is the gradient, in the
logits' own dtype (bf16 under autocast). On a GPU the same copies decide how large a micro-batch
fits: one `33m` step at 32 x 512 peaks at about 12.6 GiB with the plain path and 5 GiB with this
one (tests/test_memory.py measures it with fake tensors). Under torch.compile it is the plain path,
which inductor fuses itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 numbers per chunk, by device. CPU: 64 rows x 50,257 fp32 = 12.9 MB, which stays in the
# last-level cache and under glibc's largest reusable heap block (32 MB), so chunks are neither
# re-fetched nor re-mapped. GPUs: 1,024 rows (206 MB), so that a 32 x 512 micro-batch is 16 chunks,
# each a handful of kernels large enough to keep the GPU busy, and the caching allocator reuses them.
CHUNK_FLOATS = {"cpu": 64 * 50257, "cuda": 1024 * 50257, "mps": 1024 * 50257}


def chunk_rows(device_type: str, vocab_size: int) -> int:
    return max(1, CHUNK_FLOATS.get(device_type, CHUNK_FLOATS["cuda"]) // vocab_size)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        N, V = logits.shape
        valid = targets != -1
        safe = targets.clamp(min=0)  # an ignored row reads logit 0 and is then multiplied by 0
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, chunk):
            logp = torch.log_softmax(logits[i : i + chunk], dim=-1, dtype=torch.float32)  # (n, V) fp32
            nll[i : i + chunk] = -logp.gather(1, safe[i : i + chunk, None]).squeeze(1)
        n_valid = valid.sum()
        ctx.save_for_backward(logits, safe, valid, n_valid)
        ctx.chunk = chunk
        return (nll * valid).sum() / n_valid  # 0/0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, n_valid = ctx.saved_tensors
        N, V = logits.shape
        chunk = ctx.chunk
        grad = torch.empty_like(logits)
        # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid on rows that count, else 0
        row_scale = valid.to(torch.float32) * (grad_loss.float() / n_valid)  # (N,)
        for i in range(0, N, chunk):
            j = min(i + chunk, N)
            g = torch.softmax(logits[i:j], dim=-1, dtype=torch.float32)  # (n, V) fp32
            g.scatter_add_(1, safe[i:j, None], torch.full((j - i, 1), -1.0, device=g.device))
            grad[i:j] = g.mul_(row_scale[i:j, None])
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32) of `logits` (N, V) against `targets` (N,), ignoring targets of -1.

    chunk: rows per chunk (default: by the logits' device, CHUNK_FLOATS)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if torch.compiler.is_compiling():  # inductor fuses the plain path (it would unroll the chunk loop instead)
        return F.cross_entropy(logits.float(), targets, ignore_index=-1)
    return _ChunkedCrossEntropy.apply(logits, targets, chunk or chunk_rows(logits.device.type, logits.shape[1]))
