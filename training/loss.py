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


def video_block(model: TraceModel, batch: Batch) -> Tensor:
    """Each sample's video block [B, F*(S+6), H] as the LLM reads it: per frame its slots
    (from the pixels, or the embeddings of ``batch.frame_ids`` where those are given), then
    its time tokens."""
    ids = batch.frame_ids  # [B, F, S] or None
    b, f = batch.time_ids.shape[:2]
    h = model.config.hidden_size
    if ids is not None and bool((ids >= 0).all()):
        # Every frame shown as words: the vision tower's output would be thrown away whole
        # (and its parameters get no gradient either way), so it is not run.
        slots = model.model.embed_tokens(ids)  # [B, F, S, H]
        times = model.model.time_tower(batch.time_ids.flatten(0, 1)).to(slots.dtype)  # [B*F, 6, H]
        return torch.cat([slots, times.view(b, f, -1, h)], dim=2).flatten(1, 2)
    feats = model.encode_frames(batch.pixel_values.flatten(0, 1))  # [B*F, P, D]
    # project() lays frames out in order, so B*F frames reshape into B blocks.
    block = model.project(feats, batch.time_ids.flatten(0, 1)).view(b, -1, h)
    return block if ids is None else words_for_pixels(model, block, ids)


def sequence_embeddings(model: TraceModel, batch: Batch, block: Tensor | None = None) -> Tensor:
    """Input embeddings [B, L, H] with each sample's video block (default:
    :func:`video_block`) spliced in."""
    if block is None:
        block = video_block(model, batch)
    emb = model.embed(batch.input_ids.clamp(min=0))  # video positions: a dummy id, replaced
    pos = batch.video_start[:, None] + torch.arange(block.shape[1], device=emb.device)
    index = pos[..., None].expand(-1, -1, emb.shape[-1])
    return emb.scatter(1, index, block.to(emb.dtype))


def words_for_pixels(model: TraceModel, block: Tensor, frame_ids: Tensor) -> Tensor:
    """Put the word embeddings of frame_ids [B, F, S] (-1: keep the pixels' slots) on the
    slot positions of block [B, F*(S+6), H]; the frames' time tokens stay."""
    b, f, s = frame_ids.shape
    frames = block.view(b, f, -1, block.shape[-1])  # [B, F, S+6, H]
    words = model.model.embed_tokens(frame_ids.clamp(min=0)).to(block.dtype)  # [B, F, S, H]
    slots = torch.where((frame_ids >= 0)[..., None], words, frames[:, :, :s])
    return torch.cat([slots, frames[:, :, s:]], dim=2).flatten(1, 2)


def slot_loss(model: TraceModel, block: Tensor, slot_ids: Tensor, ordered: bool = False) -> Tensor:
    """How far the pixel slots of ``block`` [B, F*(S+6), H] (:func:`video_block`) are from
    the embeddings of their frames' words ``slot_ids`` [B, F, S] (-1: no target).

    Without ``ordered`` the targets go to slots in any order: which slot pools which
    shape is the projector's choice, so targets are assigned to slots greedily, nearest
    pair first (the filler word repeats, which makes an exact assignment pointless). With
    it, slot k aims at target k (a fixed per-word layout, ``frame_word_slots``), since
    the LLM reads the layout it learnt, positions included. Mean squared distance,
    relative to the targets' mean squared norm; the embeddings are targets only (no
    gradient into them).
    """
    b, f, s = slot_ids.shape
    slots = block.view(b, f, -1, block.shape[-1])[:, :, :s].flatten(0, 1)  # [N, S, H]
    ids = slot_ids.flatten(0, 1)  # [N, S]
    keep = (ids >= 0).all(dim=1)
    slots, ids = slots[keep], ids[keep]
    if not len(ids):
        return block.sum() * 0.0
    with torch.no_grad():
        target = model.model.embed_tokens(ids).to(slots.dtype)  # [N, S, H]
    if ordered:
        scale = target.square().sum(-1).mean().clamp(min=1e-12)
        return (slots - target).square().sum(-1).mean() / scale
    with torch.no_grad():
        cost = torch.cdist(slots.detach(), target).square()  # [N, S slots, S targets]
        match = torch.empty_like(ids)  # slot -> target index
        rows = torch.arange(len(ids), device=ids.device)
        for _ in range(s):
            flat = cost.flatten(1).argmin(dim=1)
            slot, tgt = flat // s, flat % s
            match[rows, slot] = tgt
            cost[rows, slot, :] = float("inf")
            cost[rows, :, tgt] = float("inf")
        aim = target.gather(1, match[..., None].expand_as(target))  # [N, S, H]
        scale = aim.square().sum(-1).mean().clamp(min=1e-12)
    return (slots - aim).square().sum(-1).mean() / scale


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
    """``forward(batch) -> (loss, parts)``: the heads' losses and, with ``slot_weight``,
    the slot term (:func:`slot_loss`), weighted; ``loss`` is their sum."""

    def __init__(
        self,
        model: TraceModel,
        grad_checkpoint: bool = False,
        slot_weight: float = 0.0,
        ordered_slots: bool = False,
    ):
        super().__init__()
        self.ordered_slots = ordered_slots
        self.model = model
        self.grad_checkpoint = grad_checkpoint
        self.slot_weight = slot_weight

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        model = self.model
        if model.cache_len:
            raise RuntimeError("training needs a model without KV caches")
        block = video_block(model, batch)
        emb = sequence_embeddings(model, batch, block)
        pos = torch.arange(emb.shape[1], device=emb.device)
        hidden = model.forward_embeds(emb, pos, grad_checkpoint=self.grad_checkpoint)
        parts = head_losses(model, hidden, batch.labels)
        loss = sum(parts.values())
        if self.slot_weight:  # every batch, with or without targets: one graph for DDP
            ids = batch.slot_ids
            parts["slots"] = (
                block.sum() * 0.0
                if ids is None
                else slot_loss(model, block, ids, self.ordered_slots)
            )
            loss = loss + self.slot_weight * parts["slots"]
        return loss, parts
