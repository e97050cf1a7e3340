"""DWC downlink: Dynamic Weight-update Compression of adapter deltas (cloud -> device).

The cloud holds, per device, a *mirror* of the device's adapter state (``base``) and the newly
distilled state it wants the device to have (``target``). :func:`build_update` compresses the
change into one ``"update"`` packet (:mod:`cdcca.wire`), and returns the mirror the device will
hold after applying it, computed through the very code path the device runs
(``wire.decode`` -> :func:`decode_update` -> :func:`apply_delta`), so cloud mirror and device are
bit-identical (same :func:`~cdcca.adapter_state.state_hash`). This package is pure tensors: no
disk, no network (the device-side store is :mod:`cdcca.runtime.adapter_store`).

Algorithm (one round)
---------------------
1. **Delta with error feedback.** ``residual`` is the *undelivered mass*: the cloud's previous
   target minus the device's state (``prev_target = base + residual``). The vector compressed is
   ``Δ = (target - prev_target) + residual``. With ``error_feedback=True`` that is exactly
   ``target - base`` (what earlier rounds dropped is re-offered); with ``error_feedback=False``
   it is only the new increment ``target - prev_target`` and dropped mass is never re-sent, so it
   accumulates on the device. In both modes the returned residual is
   ``(target - base) - applied``, i.e. ``target - new_mirror`` up to fp32 rounding (the ledger of
   undelivered mass; with error feedback this is exactly ``Δ - applied``). Feed it back next
   round; pass ``None`` (zeros) after a resync or for the first round. (Literally adding the
   residual to ``target - base`` would count the dropped mass twice, because ``base`` is the
   device mirror, which already lags the cloud by exactly that mass.)
2. **Selection** by magnitude, globally over all tensors (``scope="global"``, one threshold) or
   per tensor (``scope="per_tensor"``, byte budget split in proportion to tensor size, energy
   target applied to each tensor's own norm). The largest entries are kept while the estimated
   packet stays within ``budget_bytes`` and/or until their squared norm reaches ``energy`` of
   ``‖Δ‖²`` (both set: the smaller set wins). The byte estimate is exact up to a few bytes:
   per value ``value bits + 2/group_size`` (fp16 scale per group) plus, per tensor, the index
   cost of the cheapest of four modes:

   ======== =========================================================================
   skip     nothing selected: 0 bytes, delta 0
   sparse   sorted flat positions as gaps (``p0+1, p1-p0, ...``, all >= 1) in uint8, uint16 or
            uint32 (little endian, cheapest chosen per tensor); a gap >= ``M = 2**bits - 1`` is
            written as ``gap // M`` escape words ``M`` followed by ``gap % M``, so a position is
            simply ``cumsum(words)[terminal] - 1``
   bitmask  ``ceil(numel/8)`` bytes of packed bits (little bit order), when many entries are
            chosen (roughly > 1/8 for int8)
   dense    every entry of the tensor, no index, when that costs no more than the above
            (small tensors such as norms/biases, or nearly all entries chosen)
   ======== =========================================================================

3. **Quantization** of the concatenated stream of sent values (tensors in sorted-name order,
   positions ascending), in groups of ``group_size`` consecutive values (groups may span tensor
   boundaries): ``int8`` symmetric (scale = absmax/127, codes -127..127), ``int4`` symmetric
   (absmax/7, codes -7..7 stored as nibbles 1..15, two per byte, low nibble first), ``nf4`` (the
   QLoRA 16-level NormalFloat codebook, scale = absmax, nibbles 0..15) or ``fp16`` (values cast,
   no scales). Scales are fp16 normalised by one packet-wide power of two ``2**scale_exp`` (in
   meta; fp16 values use the same trick) so tiny deltas do not underflow fp16; scales are rounded
   *up* so codes never clip. Groups whose scale is below ~6e-8 of the largest scale decode to 0.
4. **Entropy coding**: each byte blob is zlib/lzma(raw LZMA2)-compressed when that makes it
   smaller; the codec used per blob is recorded in meta.

Packet layout (``kind="update"``; all names/values below are exact)
-------------------------------------------------------------------
Tensors (all 1-D; the adapter key names live inside ``dwc::keys``, not in tensor names):

* ``dwc::keys``  uint8: UTF-8 JSON ``{"names": [...sorted keys...], "shapes": [[...], ...]}``
  (every key of the adapter, sent or not), possibly compressed (``keys_codec``).
* ``dwc::idx``   uint8: a table of ``K x 4`` little-endian int32 rows
  ``(mode, count, index_width, index_nbytes)`` (mode 0 skip, 1 sparse, 2 bitmask, 3 dense;
  ``count`` = values sent for that key) followed by the index streams of the sparse/bitmask keys
  in key order; possibly compressed (``idx_codec``).
* ``dwc::q``     uint8: packed codes of the value stream (int8: 1 byte/value; int4/nf4: 2 per
  byte, odd tail padded with nibble 0; fp16: 2 bytes/value little endian); ``q_codec``.
* ``dwc::scale`` float16: ``ceil(n_values/group_size)`` scales (empty for fp16).

Meta (strings): ``dwc_format`` (``"1"``), ``device_id``, ``base_version``, ``new_version``,
``base_hash`` (``state_hash(base)``), ``result_hash`` (``state_hash`` of the state after
applying), ``round``, ``quantizer``, ``group_size``, ``compressor`` (configured), ``scope``,
``error_feedback``, ``n_values``, ``scale_exp``, ``keys_codec``/``idx_codec``/``q_codec`` and
``keys_nbytes``/``idx_nbytes``/``q_nbytes`` (uncompressed sizes, bounding decompression).

Byte budget: ``budget_bytes`` bounds the *whole encoded packet* (wire header, meta and all
tensors): ``len(packet) <= budget_bytes`` always, no extra header allowance. The fixed part
(wire header + meta + key list, measured by encoding a skeleton packet, + 16 bytes/key table +
128 bytes slack) is subtracted and the rest is spent on values and indices using the raw
(uncompressed) cost model. Every candidate packet is then measured exactly (``result_hash`` has a
fixed length), and when the blobs compressed, the selection is re-fitted with the raw budget
scaled up by the room left (secant search, at most 6 packings, up to 2x the raw budget), keeping
the largest packet that fits. A budget below the fixed part raises ``ValueError``.

The resync packet (``kind="resync"``, :func:`build_resync`) carries the full fp32 state, tensor
name = adapter key, with meta ``dwc_format``, ``device_id``, ``version``, ``result_hash``.

Package layout: :mod:`~cdcca.downlink.config` (format constants, :class:`DWCConfig`,
:class:`UpdateStats`, :func:`next_budget`), :mod:`~cdcca.downlink.selection` (step 2),
:mod:`~cdcca.downlink.indices` (the index streams), :mod:`~cdcca.downlink.quantize` (step 3),
:mod:`~cdcca.downlink.packet` (codecs, decoding, :func:`apply_delta`, resync) and
:mod:`~cdcca.downlink.build` (:func:`build_update`).
"""

from cdcca.lazy import lazy_exports

# loaded on first use, so that the torch-free config (read by every command before any model loads) stays so
_EXPORTS: dict[str, tuple[str, ...]] = {
    "cdcca.downlink.build": ("build_update",),
    "cdcca.downlink.config": ("COMPRESSORS", "DWC_FORMAT", "MAX_DECODE_ENTRIES", "MODES", "QUANTIZERS", "SCOPES",
                              "DWCConfig", "UpdateStats", "next_budget"),
    "cdcca.downlink.packet": ("apply_delta", "build_resync", "decode_resync", "decode_update", "readdress_update"),
    "cdcca.downlink.quantize": ("NF4_CODEBOOK",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
