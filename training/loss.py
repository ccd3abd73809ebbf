"""The training forward pass and TRACE's loss: the sum of the three heads' cross-entropies.

Built from the shared model's stage methods (``encode_frames``, ``project``, ``embed``,
``forward_embeds``, ``head_logits``), never a copy of them. Wrapped in an ``nn.Module`` so
DDP sees one ``forward`` (gradient all-reduce hooks fire only through it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trace_rt.model import TraceModel
from trace_rt.tokens import Head
from training.dataset import IGNORE, Batch

HEAD_NAMES = {Head.TEXT: "text", Head.TIME: "time", Head.SCORE: "score"}


def sequence_embeddings(model: TraceModel, batch: Batch) -> Tensor:
    """Input embeddings [B, L, H] with each sample's video block spliced in."""
    b = batch.pixel_values.shape[0]
    feats = model.encode_frames(batch.pixel_values.flatten(0, 1))  # [B*F, P, D]
    # project() lays frames out in order, so B*F frames reshape into B blocks.
    block = model.project(feats, batch.time_ids.flatten(0, 1)).view(b, -1, model.config.hidden_size)
    if batch.frame_ids is not None:
        block = _words_for_pixels(model, block, batch.frame_ids)
    emb = model.embed(batch.input_ids.clamp(min=0))  # video positions: a dummy id, replaced
    pos = batch.video_start[:, None] + torch.arange(block.shape[1], device=emb.device)
    index = pos[..., None].expand(-1, -1, emb.shape[-1])
    return emb.scatter(1, index, block.to(emb.dtype))


def _words_for_pixels(model: TraceModel, block: Tensor, frame_ids: Tensor) -> Tensor:
    """Put the word embeddings of frame_ids [B, F, S] (-1: keep the pixels' slots) on the
    slot positions of block [B, F*(S+6), H]; the frames' time tokens stay."""
    b, f, s = frame_ids.shape
    frames = block.view(b, f, -1, block.shape[-1])  # [B, F, S+6, H]
    words = model.model.embed_tokens(frame_ids.clamp(min=0)).to(block.dtype)  # [B, F, S, H]
    slots = torch.where((frame_ids >= 0)[..., None], words, frames[:, :, :s])
    return torch.cat([slots, frames[:, :, s:]], dim=2).flatten(1, 2)


def head_losses(model: TraceModel, hidden: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Mean cross-entropy per head over its labelled positions (labels [3, B, L]).

    Position p predicts the token at p + 1 (labels are aligned with the input, as in the
    release). Logits are computed only where a head has labels, which keeps the 32001-way
    text head off the long prompt/video part. A head with no labels in the batch adds a
    zero that still touches its weights, so every process runs the same graph (DDP).
    """
    h = hidden[:, :-1]
    out = {}
    for head in Head:
        lab = labels[int(head), :, 1:]
        m = lab != IGNORE
        logits = model.head_logits(h[m], head)  # [N, V] fp32
        if m.any():
            out[HEAD_NAMES[head]] = F.cross_entropy(logits, lab[m])
        else:
            out[HEAD_NAMES[head]] = logits.sum() * 0.0
    return out


class TraceLoss(nn.Module):
    """``forward(batch) -> (loss, per-head losses)``; ``loss`` is their sum."""

    def __init__(self, model: TraceModel, grad_checkpoint: bool = False):
        super().__init__()
        self.model = model
        self.grad_checkpoint = grad_checkpoint

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        model = self.model
        if model.cache_len:
            raise RuntimeError("training needs a model without KV caches")
        emb = sequence_embeddings(model, batch)
        pos = torch.arange(emb.shape[1], device=emb.device)
        hidden = model.forward_embeds(emb, pos, grad_checkpoint=self.grad_checkpoint)
        parts = head_losses(model, hidden, batch.labels)
        return sum(parts.values()), parts
