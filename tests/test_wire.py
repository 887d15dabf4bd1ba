"""Our packing of arrays into Flower records is Flower's own, byte for byte, only faster."""

import numpy as np
import pytest
from flwr.app import Array

from flower_p2p.wire import from_array, from_record, to_array, to_record

RNG = np.random.default_rng(0)
ARRAYS = {
    "float32 matrix": RNG.normal(size=(3, 4)).astype(np.float32),
    "int64 vector": np.arange(10),
    "empty": np.zeros((0, 5)),
    "bool": np.array([True, False]),
    "transposed (not C-contiguous)": RNG.normal(size=(4, 5)).T,
    "0-d": np.array(7, dtype=np.int64),
    "numpy scalar": np.float32(3.0),
    "float16 3-d": RNG.normal(size=(2, 3, 4)).astype(np.float16),
    "unicode": np.array(["ab", "c"]),
    "big-endian": np.arange(6, dtype=">f8").reshape(2, 3),
    "ones": np.ones((1, 1, 1)),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_to_array_is_flowers_array_byte_for_byte(name):
    value = ARRAYS[name]
    ours, flowers = to_array(value), Array(np.ascontiguousarray(value))
    assert (ours.dtype, tuple(ours.shape), ours.stype, ours.data) == (
        flowers.dtype, tuple(flowers.shape), flowers.stype, flowers.data)  # fmt: skip


@pytest.mark.parametrize("name", ARRAYS)
def test_from_array_reads_what_flower_reads_into_a_writable_array(name):
    packed = Array(np.ascontiguousarray(ARRAYS[name]))
    ours, flowers = from_array(packed), packed.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    np.testing.assert_array_equal(ours, flowers)
    assert ours.flags.writeable and ours.flags.c_contiguous
    if ours.size:
        ours.flat[0] = ours.flat[1 % ours.size]  # its own copy: the record is unchanged
        np.testing.assert_array_equal(packed.numpy(), flowers)


def test_from_array_falls_back_to_flower_for_what_it_does_not_read_itself():
    fortran = np.asfortranarray(RNG.normal(size=(3, 4)))
    packed = Array(fortran)  # np.save keeps Fortran order in its header
    assert b"'fortran_order': True" in packed.data
    np.testing.assert_array_equal(from_array(packed), fortran)


def test_a_record_round_trips():
    params = {k: v for k, v in ARRAYS.items() if k != "unicode"}
    back = from_record(to_record(params))
    assert list(back) == list(params)
    for k, v in params.items():
        np.testing.assert_array_equal(back[k], np.ascontiguousarray(v))
