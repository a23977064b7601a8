"""The generated tasks: deterministic in the step, held-out splits, and labels that are right."""

import dataclasses

import numpy as np
import pytest

from zoo.data import RunningParity, batch_rng, segmented_parity


def parity_by_loop(bits, reset):
    """Running XOR restarted at every segment start, one position at a time."""
    out = np.zeros_like(bits)
    for b in range(bits.shape[0]):
        acc = 0
        for t in range(bits.shape[1]):
            if reset[b, t]:
                acc = 0
            acc ^= int(bits[b, t])
            out[b, t] = acc
    return out


@pytest.mark.parametrize("min_segment", [None, 1, 5])
def test_batch_is_a_function_of_seed_split_and_step_alone(min_segment):
    task = RunningParity(length=24, batch_size=6, min_segment=min_segment, seed=3)
    later = task.batch(7)
    for _ in range(3):                      # drawing other batches first changes nothing
        task.batch(1)
    again = dataclasses.replace(task).batch(7)
    for key in ("inputs", "targets", "mask", "reset"):
        np.testing.assert_array_equal(later[key], again[key])
    assert not np.array_equal(task.batch(7)["inputs"], task.batch(8)["inputs"])
    assert not np.array_equal(task.batch(7)["inputs"], task.batch(7, split="eval")["inputs"])
    other_seed = RunningParity(length=24, batch_size=6, min_segment=min_segment, seed=4)
    assert not np.array_equal(task.batch(7)["inputs"], other_seed.batch(7)["inputs"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_segment", [None, 1, 4])
def test_parity_targets_equal_a_running_xor_restarted_at_each_reset(seed, min_segment):
    task = RunningParity(length=33, batch_size=5, min_segment=min_segment, seed=seed)
    batch = task.batch(seed * 11 + 2)
    np.testing.assert_array_equal(batch["targets"], parity_by_loop(batch["inputs"], batch["reset"]))


def test_segmented_parity_on_arbitrary_resets_equals_the_loop():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=(7, 40))
    reset = rng.random((7, 40)) < 0.2          # resets anywhere, including none at t = 0
    np.testing.assert_array_equal(segmented_parity(bits, reset), parity_by_loop(bits, reset))


def test_batch_has_the_documented_shapes_and_dtypes():
    batch = RunningParity(length=10, batch_size=3).batch(0)
    assert set(batch) == {"inputs", "targets", "mask", "reset"}
    assert all(v.shape == (3, 10) for v in batch.values())
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == bool and batch["reset"].dtype == bool
    assert batch["mask"].all()
    assert set(np.unique(batch["inputs"])) <= {0, 1}


@pytest.mark.parametrize("min_segment", [1, 3, 9, 16])
def test_segments_start_at_zero_and_are_at_least_min_segment_long_except_the_last(min_segment):
    batch = RunningParity(length=16, batch_size=50, min_segment=min_segment, seed=1).batch(0)
    for row in batch["reset"]:
        starts = np.flatnonzero(row)
        assert starts[0] == 0
        assert np.all(np.diff(starts) >= min_segment)
    if min_segment == 16:
        assert batch["reset"].sum() == 50
    if min_segment == 1:
        assert batch["reset"].sum() > 100      # packing happens


def test_bad_arguments_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match="min_segment"):
        RunningParity(length=8, min_segment=9)
    with pytest.raises(ValueError, match="length"):
        RunningParity(length=0)
    with pytest.raises(ValueError, match="split"):
        batch_rng(0, "test", 0)
    with pytest.raises(ValueError, match="step"):
        RunningParity().batch(-1)
