"""Split fine-tuning with a transformers ``Trainer``: the one-line change is wrapping the model.

    model = SimulatedSplit(model, at=3, mode="bottleneck", rank=4)   # <- the split

Everything else is the usual ``Trainer`` script (MiniLM, sequence classification, a
handful of in-file sentences).  The edge runs MiniLM up to layer 3's attention and sends a
rank-4 int8 code per real token; the cloud sends back int8 gradients.  Afterwards the split
is merged into one model that evaluates without any split.

Each step's batch is all eight sentences, so the first and the last logged loss are losses on
the same examples and the printed ``loss first -> last`` must fall.  With batches of 4 (and lr
1e-3, 5 steps) each step saw half of the sentences: the losses went up and down (mean 0.713) and
the merged model ended at chance, training accuracy 0.50.  The learning rate is 3e-4, the plain
loop's (``split_finetune.py``) and ``sft demo``'s; with the Trainer's gradient clipping and
linear decay, 1e-3 at batch 8 learns these sentences too.

    python examples/trainer_split.py --steps 10 [--lr 3e-4]
"""
from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from sft_kernels import SimulatedSplit
from sft_kernels.split import merge, minilm_classifier
from split_finetune import LABELS, LR, TEXTS  # the same toy sentences and learning rate as the plain loop


def main(steps: int = 10, minilm=None, lr: float = LR) -> dict:
    """Train ``steps`` Trainer steps at ``lr`` through a simulated split.

    Returns the mean training loss (``loss``), the first and last step's loss, the steps taken, the
    bytes each way and the merged model's accuracy on the training sentences.  ``minilm`` is an
    optional ``(tokenizer, model)`` pair from :func:`sft_kernels.split.load_minilm`.
    """
    tok, model = minilm_classifier(num_labels=2, minilm=minilm)
    model = SimulatedSplit(model, at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr")
    data = [{**tok(text), "labels": label} for text, label in zip(TEXTS, LABELS)]
    with tempfile.TemporaryDirectory() as out:
        # batch = all of TEXTS: every logged loss is over the same examples (see the module docstring)
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=len(TEXTS),
                                 learning_rate=lr, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                                 seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tok))
        loss = trainer.train().training_loss
    step_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # logging_steps=1: one per step
    merged = merge(model.edge, model.cloud).eval()  # one BertForSequenceClassification, no split
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = merged(**batch).logits.argmax(-1)
    if not math.isfinite(loss):
        raise RuntimeError(f"training diverged: loss {loss}")
    accuracy = float((pred == torch.tensor(LABELS)).float().mean())
    return {"loss": loss, "first_loss": step_losses[0], "last_loss": step_losses[-1],
            "steps": trainer.state.global_step, "sent_bytes": model.bytes_sent,
            "received_bytes": model.bytes_received, "train_accuracy": accuracy}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="Trainer steps (default 10)")
    ap.add_argument("--lr", type=float, default=LR, help=f"learning rate (default {LR:g})")
    args = ap.parse_args()
    r = main(args.steps, lr=args.lr)
    print(f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} (step 1 -> {r['steps']}, the same 8 sentences; "
          f"mean {r['loss']:.4f})")
    print(f"sent {r['sent_bytes']} B, received {r['received_bytes']} B; merged model's training accuracy "
          f"{r['train_accuracy']:.2f}")
