"""The static-shape decoder contract for Ascend (ATC) and a reference runner for it.

Torch-free: this is what an Ascend runtime (ACL, ``aclmdlExecute``) has to do with the
variants ``python -m export atc`` writes, expressed with onnxruntime on the CPU so the
tests can check it against the artifact's dynamic decoder.

Decoder roles come from the manifest's graph spec, never from hard-coded names: the first
input is the embeddings ``[1, seq, hidden]`` (its axis 1 names the sequence dim), the
int64 input over that dim is the positions, every other input is a past K/V buffer (pairs
per layer, key first, over one other symbolic dim: the past length), the output without
symbolic dims is the logits, and the remaining outputs are the new positions' K/V.

The protocol (``capacity`` = max_seq - 1 past slots, ``prefill_len`` = P):

- Prefill of a prompt of n embeddings: run the prefill variant on the first n - 1
  embeddings right-padded to P (pad rows are zeros; positions run 0..P-1 through the
  pads). The causal mask keeps every real position from seeing a pad, so the real rows'
  K/V are exact; the runtime copies those n - 1 rows into its K/V buffers (slot j holds
  position j) and ignores the rest and the logits (they belong to the last pad).
- The n-th (last) prompt embedding then goes through one decode step, whose logits are
  the prompt's next-token logits. Costs one decode step, and keeps the graph's I/O
  exactly the spec's (no "which row" input).
- Decode step at position p: the decode variant takes the whole buffers (capacity slots)
  and ``position_ids = [[p]]``; slots j >= p hold stale or pad data and are masked inside
  the graph by ``j < position_ids[0, 0]`` (slot j holds position j, so this is the model's
  own causal rule). The new K/V [1, 1, kv, hd] go into slot p. Buffers must hold finite
  values (zero-initialise them): a masked slot gets probability 0, but 0 x NaN is NaN.
  The step at p = capacity (position max_seq - 1) still runs; its K/V have no slot.
- With ``--dynamic-dims`` the same holds per gear: prefill pads to the smallest seq gear
  >= n - 1, and a decode step binds the first ``g`` slots for the smallest past gear
  ``g >= p`` (a prefix, contiguous in the seq-major layout), so early steps read less.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trace_rt.errors import TraceError
from trace_rt.graphs import BATCH_DIM, GraphSpec, TensorSpec

STALE = 1e3  # what the reference runner leaves in unused cache slots


class AtcError(TraceError):
    """The artifact cannot be turned into ATC variants (named reason)."""


@dataclass(frozen=True)
class DecoderRoles:
    """The decoder spec's tensors by role (see the module docstring for the rules)."""

    embeds: TensorSpec
    positions: TensorSpec
    logits: TensorSpec
    past: tuple[tuple[TensorSpec, TensorSpec], ...]  # per layer (key, value) inputs
    new: tuple[tuple[TensorSpec, TensorSpec], ...]  # per layer (key, value) outputs
    seq_dim: str
    past_dim: str
    past_axis: int  # axis of past_dim in the past inputs
    new_axis: int  # axis of seq_dim in the new K/V outputs

    @property
    def layers(self) -> int:
        return len(self.past)


def decoder_roles(spec: GraphSpec) -> DecoderRoles:
    """Assign roles to the decoder spec's inputs/outputs, or say why they do not fit."""
    embeds = spec.inputs[0]
    if len(embeds.shape) != 3 or not isinstance(embeds.shape[1], str):
        raise AtcError(f"decoder input {embeds.name} {list(embeds.shape)} is not [1, seq, hidden]")
    seq = embeds.shape[1]
    rest = list(spec.inputs[1:])
    positions = [t for t in rest if t.dtype == "int64" and seq in t.shape]
    if len(positions) != 1:
        raise AtcError(f"decoder: expected one int64 input over {seq!r}, found {positions}")
    past = [t for t in rest if t is not positions[0]]
    # The batch dim (sequences decoded together) is fixed to 1 in the static variants.
    past_dims = {d for t in past for d in t.shape if isinstance(d, str)} - {BATCH_DIM}
    if len(past_dims) != 1 or seq in past_dims or len(past) % 2:
        raise AtcError(
            "decoder: the K/V inputs must come in pairs over one past-length dim other than "
            f"{seq!r}; got {[(t.name, list(t.shape)) for t in past]}"
        )
    (past_dim,) = past_dims
    logits = [
        t for t in spec.outputs if not any(isinstance(d, str) and d != BATCH_DIM for d in t.shape)
    ]
    new = [t for t in spec.outputs if t not in logits]
    if len(logits) != 1 or len(new) != len(past) or any(seq not in t.shape for t in new):
        # The concat design (present = past + new) would need the whole cache as output
        # of a static graph; the contract supported here returns only the new K/V.
        raise AtcError(
            "decoder: the ATC variants need a decoder that returns one logits tensor and "
            f"only the new positions' K/V (over {seq!r}); got outputs "
            f"{[(t.name, list(t.shape)) for t in spec.outputs]} (manifest export.kv_cache)"
        )
    axes = {t.shape.index(past_dim) for t in past}
    new_axes = {t.shape.index(seq) for t in new}
    if len(axes) != 1 or len(new_axes) != 1:
        raise AtcError("decoder: K/V tensors disagree on their sequence axis")
    return DecoderRoles(
        embeds=embeds,
        positions=positions[0],
        logits=logits[0],
        past=tuple((past[i], past[i + 1]) for i in range(0, len(past), 2)),
        new=tuple((new[i], new[i + 1]) for i in range(0, len(new), 2)),
        seq_dim=seq,
        past_dim=past_dim,
        past_axis=axes.pop(),
        new_axis=new_axes.pop(),
    )


def concrete(shape: Sequence[int | str], dims: dict[str, int]) -> tuple[int | str, ...]:
    """*shape* with the symbolic dims in *dims* replaced by their values."""
    return tuple(dims.get(d, d) if isinstance(d, str) else d for d in shape)


class StaticDecoderRunner:
    """Reference runtime for the ATC decoder variants (onnxruntime CPU, numpy buffers).

    Args:
        prefill: the prefill variant's ONNX file.
        decode: the decode-step variant's ONNX file.
        roles: :func:`decoder_roles` of the artifact's decoder spec.
        prefill_gears: the prefill sequence lengths the variant accepts (one when static).
        past_gears: the decode variant's past lengths (one when static: the capacity).
    """

    def __init__(
        self,
        prefill: str | Path,
        decode: str | Path,
        roles: DecoderRoles,
        prefill_gears: Sequence[int],
        past_gears: Sequence[int],
    ):
        import onnxruntime as ort  # the serving image has it; keep import time low here

        so = ort.SessionOptions()
        so.log_severity_level = 3
        cpu = ["CPUExecutionProvider"]
        self.sessions = {
            "prefill": ort.InferenceSession(str(prefill), so, providers=cpu),
            "decode": ort.InferenceSession(str(decode), so, providers=cpu),
        }
        self.roles = roles
        self.prefill_gears = sorted(prefill_gears)
        self.past_gears = sorted(past_gears)
        self.capacity = self.past_gears[-1]
        k = roles.past[0][0]
        batch_axis = k.shape.index(BATCH_DIM) if BATCH_DIM in k.shape else 0
        kv_shape = [d for i, d in enumerate(k.shape) if i not in (batch_axis, roles.past_axis)]
        self.dtype = np.dtype(k.dtype)
        # Canonical seq-major buffers [capacity, kv, hd] per K/V input. Unused slots hold a
        # large finite value (not zeros) so that a slot the mask failed to hide would show
        # in the logits; they must be finite, since masked V rows still meet 0 * V.
        self.buffers = [
            np.full((self.capacity, *kv_shape), STALE, self.dtype) for _ in range(2 * roles.layers)
        ]
        self.pos = 0

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Run a prompt of n embeddings [n, hidden]; returns its next-token logits [V]."""
        n = embeds.shape[0]
        if n < 1 or n - 1 > self.prefill_gears[-1] or n > self.capacity:
            raise AtcError(f"prompt of {n} positions does not fit the ATC variants")
        for b in self.buffers:
            b.fill(STALE)
        self.pos = 0
        if n > 1:
            gear = next(g for g in self.prefill_gears if g >= n - 1)
            x = np.zeros((1, gear, embeds.shape[1]), self.dtype)
            x[0, : n - 1] = embeds[: n - 1]
            feeds = {
                self.roles.embeds.name: x,
                self.roles.positions.name: np.arange(gear, dtype=np.int64)[None],
            }
            outs = self._run("prefill", feeds)
            for buf, new in zip(self.buffers, self._new_kv(outs), strict=True):
                buf[: n - 1] = new[: n - 1]  # pad rows are dropped here
            self.pos = n - 1
        return self.step(embeds[n - 1])

    def step(self, embed: np.ndarray) -> np.ndarray:
        """One decode step for the embedding [hidden] at the next position; logits [V]."""
        p = self.pos
        if p > self.capacity:  # at p == capacity the past is full: a last step, no store
            raise AtcError(f"the decode variant holds {self.capacity} past positions")
        gear = next(g for g in self.past_gears if g >= p)
        feeds = {
            self.roles.embeds.name: embed.astype(self.dtype)[None, None],
            self.roles.positions.name: np.array([[p]], np.int64),
        }
        past = [t for pair in self.roles.past for t in pair]
        for spec, buf in zip(past, self.buffers, strict=True):
            # Bind a prefix of the buffer; the layout move is free for seq-major specs.
            feeds[spec.name] = np.ascontiguousarray(
                np.moveaxis(buf[:gear][None], 1, self.roles.past_axis)
            )
        outs = self._run("decode", feeds)
        if p < self.capacity:
            for buf, new in zip(self.buffers, self._new_kv(outs), strict=True):
                buf[p] = new[0]
        self.pos = p + 1
        return outs[self.roles.logits.name][0]

    def _run(self, which: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[which]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))

    def _new_kv(self, outs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The new K/V outputs as seq-major [T, kv, hd] arrays, in buffer order."""
        new = [t for pair in self.roles.new for t in pair]
        return [np.moveaxis(outs[t.name], self.roles.new_axis, 1)[0] for t in new]
