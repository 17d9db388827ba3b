"""Each LoRA kernel of a decode step (T tokens on one adapter, influence on) plus the plain silu_mul, 3 launches
each, for ncu. Usage: python ncu_drive.py T adapters"""
import sys
import torch
sys.path.insert(0, ".")
from kernels.lora import lora_shrink_triton, lora_expand_triton, lora_expand_silu_mul_triton, make_lora_meta
from kernels.elementwise import silu_mul_triton

T, n_ad = int(sys.argv[1]), int(sys.argv[2])
S, r, H, I = 256, 16, 4096, 14336
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
ranks = torch.full((S,), r, dtype=torch.int32, device=dev)
scale = torch.ones(S, device=dev)
slots = (torch.arange(T, device=dev) % n_ad).int()
meta = make_lora_meta(slots, num_slots=S)
def ab(inp, outs):
    return ([torch.randn(S, r, inp, device=dev, dtype=bf) * .02 for _ in outs],
            [torch.randn(S, o, r, device=dev, dtype=bf) * .02 for o in outs])
a_qkv, b_qkv = ab(H, [4096, 1024, 1024])
a_gu, b_gu = ab(H, [I, I])
a_dn, b_dn = ab(I, [H])
x = torch.randn(T, H, device=dev, dtype=bf)
xd = torch.randn(T, I, device=dev, dtype=bf)
y_qkv = torch.randn(T, 6144, device=dev, dtype=bf)
gu = torch.randn(T, 2 * I, device=dev, dtype=bf)
y_dn = torch.randn(T, H, device=dev, dtype=bf)
sums = torch.zeros(2, T, device=dev)
for _ in range(3):
    h = lora_shrink_triton(x, a_qkv, ranks, meta)
    lora_expand_triton(y_qkv, h, b_qkv, ranks, scale, meta, influence=sums)
    h2 = lora_shrink_triton(x, a_gu, ranks, meta)
    lora_expand_silu_mul_triton(gu, h2, b_gu, ranks, scale, meta, influence=sums)
    silu_mul_triton(gu)
    h3 = lora_shrink_triton(xd, a_dn, ranks, meta)
    lora_expand_triton(y_dn, h3, b_dn, ranks, scale, meta, influence=sums)
torch.cuda.synchronize()
print("ok")
