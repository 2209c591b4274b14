# Probe: varlen kernels at head dim 16 (the CPU matrix's tiny models), forward and backward vs fp32.
import torch, sys
sys.path.insert(0, ".")
from models import hf_attention
from models.hf_attention import LayerOptions
from models.attention.kernels import varlen_kernels
from packing.boundaries import cumulative_lengths
g = torch.Generator().manual_seed(0); cu = cumulative_lengths([40, 3, 77, 8])
for D in (16, 32, 64):
    q, k, v = (torch.randn(128, h, D, generator=g).requires_grad_() for h in (4, 2, 2))
    w = torch.randn(128, 4, D, generator=g)
    ref = hf_attention._masked(q, k, v, cu, LayerOptions(causal=True)); rg = torch.autograd.grad((ref*w).sum(), (q, k, v))
    for name, run in varlen_kernels().items():
        try:
            x = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
            out = run(*x, cu.cuda(), 77, True); gr = torch.autograd.grad((out.float()*w.cuda()).sum(), x)
            e = [((a.float().cpu()-b).norm()/b.norm()).item() for a, b in zip([out]+list(gr), [ref]+list(rg))]
            print(f"D={D} {name}: out {e[0]:.2e} dq {e[1]:.2e} dk {e[2]:.2e} dv {e[3]:.2e}")
        except Exception as ex:
            print(f"D={D} {name}: {type(ex).__name__}: {str(ex)[:120]}")
