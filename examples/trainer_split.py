"""Split fine-tuning with a transformers ``Trainer``: the one-line change is wrapping the model.

    model = SimulatedSplit(model, at=3, mode="bottleneck", rank=4)   # <- the split

Everything else is the usual ``Trainer`` script (MiniLM, sequence classification, a
handful of in-file sentences).  The edge runs MiniLM up to layer 3's attention and sends a
rank-4 int8 code per real token; the cloud sends back int8 gradients.  Afterwards the split
is merged into one model that evaluates without any split.

    python examples/trainer_split.py --steps 5
"""
from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from sft_kernels import SimulatedSplit
from sft_kernels.split import merge, minilm_classifier
from split_finetune import LABELS, TEXTS  # the same toy sentences as the plain-loop example


def main(steps: int = 5, minilm=None) -> dict:
    """Train ``steps`` Trainer steps through a simulated split; returns the loss, bytes and merged accuracy."""
    tok, model = minilm_classifier(num_labels=2, minilm=minilm)
    model = SimulatedSplit(model, at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr")
    data = [{**tok(text), "labels": label} for text, label in zip(TEXTS, LABELS)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                                 use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tok))
        loss = trainer.train().training_loss
    merged = merge(model.edge, model.cloud).eval()  # one BertForSequenceClassification, no split
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = merged(**batch).logits.argmax(-1)
    if not math.isfinite(loss):
        raise RuntimeError(f"training diverged: loss {loss}")
    accuracy = float((pred == torch.tensor(LABELS)).float().mean())
    return {"loss": loss, "steps": trainer.state.global_step, "sent_bytes": model.bytes_sent,
            "received_bytes": model.bytes_received, "train_accuracy": accuracy}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    r = main(ap.parse_args().steps)
    print(f"{r['steps']} steps, mean loss {r['loss']:.4f}; sent {r['sent_bytes']} B, received "
          f"{r['received_bytes']} B; merged model's training accuracy {r['train_accuracy']:.2f}")
