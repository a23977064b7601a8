"""Bach chorales as binary piano rolls: polyphonic music modelling on real data, nothing downloaded.

The JSB Chorales task of Boulanger-Lewandowski, Bengio & Vincent (ICML 2012), "Modeling Temporal
Dependencies in High-Dimensional Sequences: Application to Polyphonic Music Generation and
Transcription", rebuilt from the chorales that music21 ships in its corpus (``music21/corpus/bach``),
the benchmark of Greff et al. (2017), "LSTM: A Search Space Odyssey", and Chung et al. (2014),
"Empirical Evaluation of Gated Recurrent Neural Networks on Sequence Modeling".

Corpus: every MusicXML file of ``corpus.getComposer("bach")`` (``.mxl``/``.xml``; not the Humdrum
duplicates, the roman-numeral analyses, nor ``bwv846``, a prelude) that has the four voices
``VOICES`` (``SKIPPED`` lists the exceptions); instrumental parts are dropped, as JSB has the four
voices alone.

Piano roll: the score is sampled every ``1 / frames_per_quarter`` quarter notes (1: quarter notes, as
JSB; 2: eighth notes); frame ``k`` is the set of voice pitches sounding at time ``k / frames_per_quarter``
(a note sounds on ``[offset, offset + quarterLength)``; tied notes sound throughout, so re-struck and
held notes look alike, as in JSB), a multi-hot vector over the MIDI pitches ``low_pitch..high_pitch``
(default the 88 piano keys, 21..108, as the paper). A pitch outside that range is a ValueError.

Records (vector records, ``zoo.data.vectors``): one chorale of ``T`` frames is
``targets`` float32 [T, P], the roll, and ``inputs`` float32 [T, P], the roll delayed by one frame
(an all-zero frame first), so step ``t`` predicts frame ``t`` from frames ``< t``; ``mask`` is True on
all ``T`` frames (the first frame is predicted too). ``P = high_pitch - low_pitch + 1``.

Metric: negative log-likelihood per frame under independent Bernoulli outputs, ``frame_nll``: the
model emits ``P`` logits per step; the loss is the sum over pitches of the binary cross-entropy,
averaged over the masked frames. Never a softmax over pitches.

Splits are fixed: the corpus paths (``bach/<file>``), sorted and shuffled by ``SPLIT_SEED``, give
``VALID_FRACTION`` validation and ``TEST_FRACTION`` test chorales and the rest train, about JSB's
229/76/77 proportions. ``eval_split`` picks the held-out split behind the task's ``eval``.
``max_chorales`` (and ``train_size``/``eval_size``) cap each split to its first chorales, in path
order, for small builds. Parsing is slow (about 0.3 s a chorale): a config is parsed once, when it is
built into tfds array_record files, and read from them after.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from zoo.data.tfds_task import require
from zoo.data.vectors import RealDataConfig, VectorBuilder, fixed_split, vector_task_factory

SPLIT_SEED = 0
VALID_FRACTION = TEST_FRACTION = 0.2
VOICES = ("Soprano", "Alto", "Tenor", "Bass")
HELD_OUT = ("valid", "test")
PIANO_LOW, PIANO_HIGH = 21, 108     # A0..C8, the 88 keys
SKIPPED = (
    "bach/bwv846.mxl",      # the C major prelude of the Well-Tempered Clavier, not a chorale
    "bach/bwv227.3.mxl",    # five voices (two sopranos)
    "bach/bwv27.6.mxl",     # five voices (two sopranos)
)
USED_LOW, USED_HIGH = 36, 81        # the voices' range over the corpus (music21 10.5.1): a narrower roll
LONGEST_QUARTERS = 272              # the longest chorale (bwv79.3.mxl), in quarter notes


@functools.lru_cache(maxsize=1)
def chorale_paths() -> tuple[str, ...]:
    """The corpus paths of the MusicXML chorales, ``bach/<file>``, sorted (four-voice check at build)."""
    from music21 import corpus

    paths = {f"bach/{path.name}" for path in map(_as_path, corpus.getComposer("bach"))
             if path.suffix in (".mxl", ".xml")}
    return tuple(sorted(paths - set(SKIPPED)))


def _as_path(path):
    from pathlib import Path

    return Path(str(path))


@functools.lru_cache(maxsize=1)
def split_paths() -> dict[str, tuple[str, ...]]:
    """The fixed, disjoint ``train``/``valid``/``test`` chorale paths, each sorted."""
    paths = chorale_paths()
    n_valid, n_test = round(VALID_FRACTION * len(paths)), round(TEST_FRACTION * len(paths))
    split = fixed_split(paths, {"valid": n_valid, "test": n_test, "train": 0}, SPLIT_SEED)
    return {name: tuple(chorale) for name, chorale in split.items()}


def voice_parts(score, where: str) -> list:
    """The score's four vocal parts, in ``VOICES`` order: the parts whose name starts with the voice
    (a few files name a doubled part ``"Soprano Oboe 1 Violin1"``); ValueError naming the chorale
    unless each voice is exactly one part."""
    names = [str(part.partName or "").split() for part in score.parts]
    voices = []
    for voice in VOICES:
        parts = [part for part, name in zip(score.parts, names, strict=True) if name[:1] == [voice]]
        if len(parts) != 1:
            raise ValueError(f"{where}: {len(parts)} parts named {voice!r} (need one); "
                             f"parts are {[str(part.partName) for part in score.parts]}")
        voices += parts
    return voices


def piano_roll(score, frames_per_quarter: int, low_pitch: int, high_pitch: int, where: str = "chorale"):
    """uint8 [T, high_pitch - low_pitch + 1]: 1 where a voice's pitch sounds at frame time ``k / fpq``."""
    parts = voice_parts(score, where)
    end = max(Fraction(part.highestTime) for part in parts)
    roll = np.zeros((math.ceil(end * frames_per_quarter), high_pitch - low_pitch + 1), np.uint8)
    for part in parts:
        for note in part.flatten().notes:       # notes and chords, absolute offsets; rests are not notes
            onset = Fraction(note.offset)
            first = math.ceil(onset * frames_per_quarter)
            stop = math.ceil((onset + Fraction(note.quarterLength)) * frames_per_quarter)
            for pitch in note.pitches:
                if not low_pitch <= pitch.midi <= high_pitch:
                    raise ValueError(f"{where}: pitch {pitch.midi} ({pitch}) outside "
                                     f"low_pitch={low_pitch}..high_pitch={high_pitch}")
                roll[first:stop, pitch.midi - low_pitch] = 1
    return roll


def chorale_example(roll: np.ndarray) -> dict[str, np.ndarray]:
    """The record of one roll: inputs are the targets delayed by one frame (a zero frame first)."""
    targets = roll.astype(np.float32)
    inputs = np.concatenate([np.zeros_like(targets[:1]), targets[:-1]])
    return {"inputs": inputs, "targets": targets, "mask": np.ones(len(roll), bool)}


@functools.lru_cache(maxsize=4)
def parse_chorale(path: str):
    from music21 import corpus

    return corpus.parse(path)


@dataclasses.dataclass(eq=False, kw_only=True)
class BachChoralesConfig(RealDataConfig):
    """Frames per quarter note, the pitch range, the held-out split, and size caps for small builds.

    ``max_frames``: the longest record (and default row length), by default the longest chorale,
    ``LONGEST_QUARTERS * frames_per_quarter``; a longer chorale is a build error.
    """

    frames_per_quarter: int = 1
    low_pitch: int = PIANO_LOW
    high_pitch: int = PIANO_HIGH
    eval_split: str = "valid"
    max_chorales: int | None = None
    max_frames: int | None = None

    @property
    def n_pitches(self) -> int:
        return self.high_pitch - self.low_pitch + 1

    input_dim = n_pitches
    n_targets = n_pitches
    vocab_size = n_pitches      # no tokens: the width of the input frames
    n_classes = n_pitches       # the number of output logits (independent Bernoullis)

    def source_split(self, split: str) -> str:
        return "train" if split == "train" else self.eval_split

    def max_length(self, split: str) -> int:
        return LONGEST_QUARTERS * self.frames_per_quarter if self.max_frames is None else self.max_frames

    def full_size(self, split: str) -> int:
        n = len(split_paths()[self.source_split(split)])
        return n if self.max_chorales is None else min(n, self.max_chorales)

    def check(self) -> None:
        super().check()
        require(self, self.frames_per_quarter in (1, 2, 4), "frames_per_quarter",
                "must be 1 (quarter notes), 2 (eighths) or 4 (sixteenths)")
        require(self, isinstance(self.low_pitch, int) and 0 <= self.low_pitch <= 127, "low_pitch",
                "must be a MIDI pitch in 0..127")
        require(self, isinstance(self.high_pitch, int) and self.low_pitch <= self.high_pitch <= 127,
                "high_pitch", f"must be a MIDI pitch in low_pitch={self.low_pitch}..127")
        require(self, self.eval_split in HELD_OUT, "eval_split", f"must be one of {HELD_OUT}")
        require(self, optional_positive(self.max_chorales), "max_chorales",
                "must be None (all) or a positive int")
        require(self, optional_positive(self.max_frames), "max_frames",
                "must be None (the longest chorale) or a positive int")


def optional_positive(value) -> bool:
    return value is None or (isinstance(value, int) and value >= 1)


def chorale_examples(config: BachChoralesConfig, split: str) -> Iterator[dict[str, np.ndarray]]:
    """The records of ``split``, one per chorale, in path order."""
    for path in split_paths()[config.source_split(split)][: config.split_size(split)]:
        roll = piano_roll(parse_chorale(path), config.frames_per_quarter, config.low_pitch, config.high_pitch,
                          where=path)
        if len(roll) > config.max_length(split):
            raise ValueError(f"{path}: {len(roll)} frames, more than max_frames={config.max_length(split)}")
        yield chorale_example(roll)


class BachChorales(VectorBuilder):
    """Bach chorales as binary piano rolls, next-frame NLL (Boulanger-Lewandowski et al. 2012, JSB)."""

    CONFIG = BachChoralesConfig
    examples = staticmethod(chorale_examples)


make_task = vector_task_factory(BachChorales)
