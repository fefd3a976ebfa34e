"""Step time of the TCP runtime, for an A/B of two code states on the same machine.

Trains 10 steps of SST-2 (batch 32, max length 128, seed 0) through an in-process ``CloudServer``
on loopback and prints which ``sft_kernels`` it imported, the median step time of steps 2-10 and
the loss at step 10.  Only public API that older trees have too, so the same script times both:

    git worktree add /tmp/old 5522fc2 && cp sft_kernels/_C*.so /tmp/old/sft_kernels/
    cd /tmp && for i in 1 2 3; do PYTHONPATH=/tmp/old python /work/main/bench/step_ab.py
                                  PYTHONPATH=/work/main python /work/main/bench/step_ab.py; done

(run from outside the repository, with ``SFT_GLUE_DIR`` pointing at the GLUE TSVs, so that
``PYTHONPATH`` decides which tree is imported).
"""
import statistics
import time

import sft_kernels
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudServer, EdgeTrainer, RunConfig, StepBatches

ds = load_task("SST-2", "train", limit=512)[1]
cfg = RunConfig(task="SST-2", total_steps=10, batch_size=32, max_length=128, run_id="ab", warmup_steps=1)
srv = CloudServer({"edge": b"tok"}).start()
t = EdgeTrainer(cfg, None, host=srv.address[0], port=srv.address[1], client_id="edge", token="tok", progress=False)
t.batch_at = StepBatches(t.tokenizer, ds, 32, 128, 0)
times = []
for _ in range(10):
    t0 = time.perf_counter()
    t.train_step()
    times.append(time.perf_counter() - t0)
t.close()
srv.shutdown()
print(sft_kernels.__file__, "median step", round(statistics.median(times[1:]), 4), "losses", t.summary.losses[-1])
