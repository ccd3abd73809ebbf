"""Graph variants of an artifact directory (quantised decoders), as the manifest lists them.

``python -m export quantize`` records each variant under
``manifest["variants"][graph][name]`` with its files' sha256, the scheme and the
``decoder.onnx`` it was made from. Variant files are not in ``manifest["files"]``: they
are checked here, when a runtime picks one, so loading the fp32 graphs does not hash
gigabytes of variants it will not use.

Torch-free (the serving image imports it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from trace_rt.errors import CheckpointError
from trace_rt.graphs import DECODER, MANIFEST_FILE, sha256_file

# Weights per quantisation block (int4; MatMulNBits int8): what `export quantize` accepts,
# and its default (smaller blocks: less error for a little more scale storage; 32 is
# llama.cpp's Q4_0 block). Here, not in export.quantize, so that the CLIs and the plan read
# them without loading onnx.
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32


def variant_names(manifest: dict[str, Any], graph: str = DECODER) -> list[str]:
    return sorted(manifest.get("variants", {}).get(graph, {}))


def load_variant(
    manifest: dict[str, Any],
    model_dir: str | Path,
    name: str,
    graph: str = DECODER,
    verify: str = "sha256",
) -> dict[str, Any]:
    """The manifest record of *graph*'s variant *name*, its files checked.

    Raises:
        CheckpointError: unknown variant, made from another graph than the artifact's,
            or a missing, mis-sized or mismatched file.
    """
    root = Path(model_dir)
    variants = manifest.get("variants", {}).get(graph, {})
    if name not in variants:
        have = ", ".join(variant_names(manifest, graph)) or "none"
        raise CheckpointError(
            f"{root}: no {graph} variant {name!r} in {MANIFEST_FILE} (available: {have}); "
            f"make it with `python -m export quantize {root} --int4` (or --int8, --fp8)"
        )
    rec = variants[name]
    src = rec["source"]
    # The source is the graph's own file, or (a fused form of a layer-streamed artifact's
    # quantised decoder) another variant's.
    files = dict(manifest["files"])
    for other in variants.values():
        files |= other.get("files", {})
    if files.get(src["file"], {}).get("sha256") != src["sha256"]:
        raise CheckpointError(
            f"{root}: {rec['file']} was made from another {src['file']} than this "
            f"artifact's (re-run `python -m export quantize {root}`)"
        )
    for rel, f in rec["files"].items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(
                f"{root}: {rel} is missing ({graph} variant {name!r} in {MANIFEST_FILE}); "
                f"re-run `python -m export quantize {root}`"
            )
        if path.stat().st_size != f["bytes"] or (
            verify == "sha256" and sha256_file(path) != f["sha256"]
        ):
            raise CheckpointError(
                f"{root}: {rel} does not match its record in {MANIFEST_FILE} ({graph} "
                f"variant {name!r}); re-run `python -m export quantize {root}`"
            )
    return rec


# Extra bool input (last) of the onnxruntime-specific ``fused`` decoders (export/fuse.py):
# false skips ``lm_head`` (a step with no row in the text head). Not in the portable graph.
TEXT_HEAD_INPUT = "text_head"
# decoder_variant naming ``decoder.onnx`` itself (overrides the manifest's default).
PORTABLE = "portable"


# defaults[runtime] key of the measured-fastest decoder per quantised precision.
BY_PRECISION = "decoder_by_precision"


def default_variant(manifest: dict[str, Any], runtime: str, graph: str = DECODER) -> str | None:
    """The variant *runtime* loads for *graph* when none is asked for (None: the graph).

    ``python -m export optimize`` records it in ``manifest["defaults"][runtime][graph]``
    when its measured decode step beats the portable graph's.
    """
    return manifest.get("defaults", {}).get(runtime, {}).get(graph)


def resolve_variant(
    manifest: dict[str, Any], runtime: str, asked: str | None = None, *, exact: bool = False
) -> str | None:
    """The decoder variant *runtime* runs when *asked* for one; None: ``decoder.onnx``.

    The one rule, shared by the backends and the Triton repository build:

    - None: the manifest's default for *runtime* (:func:`default_variant`);
    - ``portable``: ``decoder.onnx`` itself;
    - a precision that ``python -m export optimize`` measured (``int4``, ``int8``): the
      fastest variant of it, recorded in ``defaults[runtime]["decoder_by_precision"]``
      (``fused-int4`` when packing beat ``int4``, else ``int4`` itself);
    - any other name (or any name with *exact*): that variant.
    """
    if asked is None:
        asked = default_variant(manifest, runtime)  # optimize may record ``portable``
        if asked is None or asked == PORTABLE:
            return None
        return asked
    if asked == PORTABLE:
        return None
    if exact:
        return asked
    return manifest.get("defaults", {}).get(runtime, {}).get(BY_PRECISION, {}).get(asked, asked)


def pick_variant(
    manifest: dict[str, Any],
    model_dir: str | Path,
    runtime: str,
    asked: str | None = None,
    *,
    exact: bool = False,
    verify: str = "sha256",
) -> tuple[str | None, dict[str, Any] | None]:
    """(name, checked manifest record) of the decoder *runtime* runs for *asked*
    (:func:`resolve_variant`); (None, None): ``decoder.onnx``.

    A default is a speed-up, not a requirement: when the variant a default names has lost
    its files (a copy of the artifact that carries only some), the asked variant itself
    (or ``decoder.onnx`` when none was asked for) runs instead, with a warning. A variant
    asked for by its exact name must be there.

    Raises:
        CheckpointError: the asked variant is unknown or its files do not check out.
    """
    name = resolve_variant(manifest, runtime, asked, exact=exact)
    if name is None:
        _check_portable(manifest, model_dir)
        return None, None
    try:
        return name, load_variant(manifest, model_dir, name, DECODER, verify)
    except CheckpointError as e:
        if name == asked:  # asked for by its own name: no substitute
            raise
        if asked is None:
            _check_portable(manifest, model_dir)  # nothing to fall back to: the cause
        warnings.warn(f"{e}; running {asked or 'decoder.onnx'}", RuntimeWarning, stacklevel=3)
    if asked is None:
        return None, None
    return asked, load_variant(manifest, model_dir, asked, DECODER, verify)


def has_portable_decoder(manifest: dict[str, Any]) -> bool:
    """Whether the artifact has ``decoder.onnx``: a layer-streamed export with only
    quantised decoders (``export/stream.py``) records the decoder's spec with no files."""
    return bool(manifest["graphs"][DECODER].get("files", True))


def _check_portable(manifest: dict[str, Any], model_dir: str | Path) -> None:
    """Say that there is no ``decoder.onnx`` instead of failing to open the file."""
    if has_portable_decoder(manifest):
        return
    have = ", ".join(sorted(manifest.get("variants", {}).get(DECODER, {}))) or "none"
    raise CheckpointError(
        f"{model_dir}: this artifact has no fp32 decoder.onnx (exported layer-streamed with "
        f"only quantised decoders: {have}); run one with --quant NAME, or re-export with "
        "`python -m export onnx CKPT OUT --stream --decoders fp32,...`"
    )


def variant_record(manifest: dict[str, Any], name: str | None) -> dict[str, Any]:
    """Decoder variant *name*'s manifest record; {} for ``decoder.onnx`` (None) or a name
    the manifest does not have."""
    return manifest.get("variants", {}).get(DECODER, {}).get(name, {}) if name else {}


def variant_precision(manifest: dict[str, Any], name: str | None) -> str | None:
    """``int4``/``int8``/``fp8`` for a quantised decoder variant, None for a float one (or
    for ``decoder.onnx``): what its weights compute in, from its record, not its name."""
    if name is None:
        return None
    wt = variant_record(manifest, name).get("weight_type")
    if wt is None:
        return None
    return "fp8" if str(wt).startswith("float8") else str(wt)


def recorded_head_bits(weights: dict[str, Any], bits: int | None) -> int | None:
    """How a *bits* variant's manifest ``weights`` entry says ``lm_head`` was stored (None:
    float); records from before ``lm_head_bits`` only say whether it was quantised alike."""
    return weights.get("lm_head_bits", bits if weights.get("lm_head") else None)
