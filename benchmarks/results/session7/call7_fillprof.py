# session 7: where StepGraphs._fill's host time goes on the device machine (batch 256 decode)
import time, torch, sys
sys.path.insert(0, ".")
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence
from engine.sampling_params import SamplingParams
from engine.step_inputs import StepInputs, padded_tables, int64_tensor
from engine.cuda_graph import StepGraphs
B=256; bs=16
seqs=[]
for i in range(B):
    s=Sequence(f"r{i}", i, list(range(300)), SamplingParams(max_tokens=128))
    s.num_computed_tokens=299
    s.block_table=list(range(i*24, i*24+19))
    s.lora_slot=3
    seqs.append(s)
out=SchedulerOutput(scheduled=[ScheduledSequence(s,1,True) for s in seqs], num_batched_tokens=B)
def t(f, n=300, sync=False):
    for _ in range(20): f()
    torch.cuda.synchronize()
    t0=time.perf_counter()
    for _ in range(n):
        f()
        if sync: torch.cuda.synchronize()
    return round((time.perf_counter()-t0)/n*1e3, 4)
class M(torch.nn.Module):
    def __init__(self): super().__init__(); self.w=torch.nn.Parameter(torch.zeros(1, device="cuda"))
g=StepGraphs(M(), None, 256, 64, bs, emulate=False, max_tokens=4096)
x=StepInputs.of(out,bs); tables=padded_tables(out.scheduled,19,0)
flat=x.input_ids+x.positions+x.slot_mapping+x.token_slots+x.seq_lens+x.qsl+tables
buf=int64_tensor(flat)
pin=torch.empty(len(flat), dtype=torch.int64).pin_memory()
r = {
 "StepInputs.of": t(lambda: StepInputs.of(out, bs)),
 "shape_of": t(lambda: g.shape_of(out)),
 "padded_tables": t(lambda: padded_tables(out.scheduled, 19, 0)),
 "int64_tensor": t(lambda: int64_tensor(flat)),
 "h2d pageable": t(lambda: buf.to("cuda")),
 "h2d pinned nb": t(lambda: (pin.copy_(buf), pin.to("cuda", non_blocking=True))),
 "7 copy_": t(lambda: [g.input_ids[:256].copy_(g.positions[:256]) for _ in range(7)]),
 "_fill": t(lambda: g._fill(out, 256, 256, bs)),
 "_fill+sync": t(lambda: g._fill(out, 256, 256, bs), sync=True),
}
for k, v in r.items(): print(f"{k:20} {v:8.4f} ms")
