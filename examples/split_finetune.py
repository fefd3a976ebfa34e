"""Split fine-tuning of the embedded MiniLM in one process, with the link simulated.

The edge runs the embeddings, layers 0-2 and layer 3's attention; it sends a rank-4
bottleneck code per real token (int8 on the wire), the cloud runs the rest, the head and
the loss and sends back the int8 (stochastically rounded) gradient.  Prints the loss and
the bytes per example each way, against an uncompressed fp32 layer split.

    python examples/split_finetune.py --steps 20
"""
from __future__ import annotations

import argparse

import torch

from sft_kernels import SimulatedSplit
from sft_kernels.split import minilm_classifier

TEXTS = ["a gripping, funny and moving film", "dull, lifeless and far too long", "superb acting throughout",
         "the plot never comes together", "a small gem", "i wanted my two hours back", "warm and clever",
         "a tedious mess"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def main(steps: int = 20, minilm=None) -> dict:
    """Train ``steps`` AdamW steps on ``TEXTS``; returns the first/last loss and bytes per example."""
    tok, model = minilm_classifier(num_labels=2, minilm=minilm)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    labels = torch.tensor(LABELS)

    sim = SimulatedSplit(model, at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr").train()
    opt = torch.optim.AdamW(sim.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sim(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    n_ex = len(TEXTS) * steps
    fp32_layer = int(batch["attention_mask"].sum()) * model.config.hidden_size * 4 * steps  # per direction
    result = {"first_loss": losses[0], "last_loss": losses[-1], "sent_per_example": sim.bytes_sent / n_ex,
              "received_per_example": sim.bytes_received / n_ex, "fp32_layer_split_per_example": fp32_layer / n_ex}
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    r = main(ap.parse_args().steps)
    print(f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    print(f"bytes/example: sent {r['sent_per_example']:.0f}, received {r['received_per_example']:.0f} "
          f"(fp32 layer split: {r['fp32_layer_split_per_example']:.0f} each way)")
