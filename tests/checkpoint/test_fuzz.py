"""Fuzzing the checkpoint decoder and the manifest parser (hypothesis, bounded, no waits).

Random and mutated frames go into ``decode`` (the codec, after verification) and ``unseal``
(verification first), random and mutated JSON into ``CheckpointInfo.from_json``. Whatever the
bytes, the only exceptions are taskkit's own (``TaskkitError`` subclasses); ``unseal`` never
gets as far as unpickling bytes that are not signed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskkit._keys import KeyRing
from taskkit.checkpoint import CheckpointInfo, unseal
from taskkit.checkpoint._codec import decode, encode
from taskkit.errors import CheckpointTampered, TaskkitError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEYS = KeyRing((b"fuzzing-key-fuzzing-key",), "test")

STATES: list[Any] = [
    {"epoch": 3, "loss": 0.25, "names": ["a", "b"], "nested": {"x": (1, 2)}},
    {"weights": np.arange(24, dtype=np.float32).reshape(4, 6), "bias": np.zeros(3)},
    [1, 2.5, "three", None, True, b"bytes"],
]


def frame(state: Any, compress: bool) -> bytes:
    payload = encode(state, "pickle", 3 if compress else None)
    return b"".join(bytes(chunk) for chunk in payload.chunks)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """``source`` with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set_u64"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "set_u64" and len(data) >= 24:
            # the frame's buffer count or pickle length: huge, zero, or off by one
            field = draw(st.sampled_from([8, 16]))
            value = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, len(data), len(data) + 1]))
            data[field : field + 8] = value.to_bytes(8, "little")
    return bytes(data)


frames = st.builds(frame, st.sampled_from(STATES), st.just(False))
compressed = st.builds(frame, st.sampled_from(STATES), st.just(True))


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated(frames)))
def test_decode_of_random_and_mutated_frames_raises_only_taskkit_errors(data: bytes) -> None:
    try:
        decode(bytearray(data), "pickle", None)
    except TaskkitError:
        pass


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated(compressed)))
def test_decode_of_random_and_mutated_zlib_raises_only_taskkit_errors(data: bytes) -> None:
    try:
        decode(bytearray(data), "pickle", "zlib")
    except TaskkitError:
        pass


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=256), mutated(frames)),
    fmt=st.sampled_from(["pickle", "joblib", "json", ""]),
    compression=st.sampled_from([None, "zlib", "gzip"]),
)
def test_decode_with_any_format_names_raises_only_taskkit_errors(
    data: bytes, fmt: str, compression: str | None
) -> None:
    try:
        decode(bytearray(data), fmt, compression)
    except TaskkitError:
        pass


def manifest_of(data: bytes) -> dict[str, Any]:
    import hashlib

    return CheckpointInfo(
        run_id="run-1",
        step=1,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at="2026-01-01T00:00:00+00:00",
    ).to_dict()


@FUZZ
@given(data=mutated(frames), signature=st.one_of(st.none(), st.text(max_size=80)))
def test_unseal_refuses_unsigned_frames_before_decoding(data: bytes, signature: str | None) -> None:
    from unittest import mock

    from taskkit.checkpoint import _seal

    info = CheckpointInfo.from_dict({**manifest_of(data), "signature": signature})
    with mock.patch.object(_seal, "decode") as decoder, pytest.raises(CheckpointTampered):
        unseal(info, data, run_id="run-1", kind="checkpoint", keys=KEYS)
    decoder.assert_not_called()  # nothing reached the decoder


# -- the manifest parser ------------------------------------------------------------------------

GOOD = json.dumps(manifest_of(b"x"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
FIELDS = list(json.loads(GOOD))


@st.composite
def changed_manifests(draw: st.DrawFn) -> str:
    """The good manifest with fields replaced by random JSON values, removed, or added."""
    fields = json.loads(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from([*FIELDS, "extra"]))
        if draw(st.booleans()):
            fields[name] = draw(json_values)
        else:
            fields.pop(name, None)
    return json.dumps(fields)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        json_values.map(json.dumps),
        changed_manifests(),
        mutated(st.just(GOOD.encode())),
    )
)
def test_the_manifest_parser_raises_only_taskkit_errors(text: str | bytes) -> None:
    try:
        info = CheckpointInfo.from_json(text)
    except TaskkitError:
        return
    assert isinstance(info.step, int)
    assert isinstance(info.size, int)
    info.signed_bytes()  # a parsed manifest can always be verified


def test_the_parser_and_the_decoder_still_raise_value_errors_for_old_callers() -> None:
    """Their errors are TaskkitErrors now, and still ValueErrors (storages catch those)."""
    with pytest.raises(ValueError, match="manifest"):
        CheckpointInfo.from_json("[]")
    with pytest.raises(ValueError, match="frame"):
        decode(bytearray(b"short"), "pickle", None)
