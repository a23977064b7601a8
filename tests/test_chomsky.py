"""The Chomsky-hierarchy task generators (Delétang et al., ICLR 2023) against independent references.

Every label is recomputed here from the input tokens alone with plain Python (``eval`` for the
arithmetic, Python ints for the binary tasks, ``math.isqrt``, ``sorted``, a list as a stack), never
with the generators' own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from zoo.data.chomsky import (
    LEVELS,
    N_CLASSES,
    TASKS,
    TEST_MAX_LENGTH,
    TEST_MIN_LENGTH,
    TRAIN_MAX_LENGTH,
    TRAIN_MIN_LENGTH,
    VOCAB_SIZES,
    ChomskyTask,
    collate,
    sample_length,
)

# Small shapes: compiling dominates, and XLA's optimisation passes do not change the values tested.
pytestmark = pytest.mark.usefixtures("quick_compile")

# The paper's input_size (our vocab less the blank) and output_size for each task.
PAPER_SIZES = {
    "even_pairs": (2, 2),
    "parity_check": (2, 2),
    "modular_arithmetic": (8, 5),  # digits, + - *; the paper's unused "_" operator is left out
    "cycle_navigation": (3, 5),
    "stack_manipulation": (5, 3),
    "reverse_string": (2, 2),
    "modular_arithmetic_brackets": (9, 5),  # digits, + - ( ); the paper's unused * and x are left out
    "solve_equation": (11, 5),
    "duplicate_string": (2, 2),
    "missing_duplicate_string": (4, 2),
    "odds_first": (2, 2),
    "binary_addition": (3, 3),
    "binary_multiplication": (3, 3),
    "compute_sqrt": (2, 2),
    "bucket_sort": (5, 5),
}

LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 25, 40, 57)
SEEDS = (0, 1, 2)


def examples(name, lengths=LENGTHS, seeds=SEEDS):
    """(length, input symbols, counted answer, full answer) for random examples of ``name``."""
    spec = TASKS[name]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for length in lengths:
            ex = spec.generate(rng, length)
            n_in = spec.input_length(length)
            yield (length, ex["inputs"][:n_in].tolist(), ex["targets"][ex["mask"]].tolist(),
                   ex["targets"][n_in:].tolist())


def little_endian_value(bits):
    return int("".join(str(b) for b in reversed(bits)), 2)


def little_endian(number):
    return [int(c) for c in reversed(bin(number)[2:])]


def check_even_pairs(length, s, answer, full):
    unequal_pairs = sum(a != b for a, b in zip(s, s[1:], strict=False))
    assert answer == [unequal_pairs % 2] == [int(s[0] != s[-1])]


def check_parity_check(length, s, answer, full):
    assert answer == [s.count(1) % 2]


def check_modular_arithmetic(length, s, answer, full):
    assert len(s) == (length if length % 2 else length - 1)
    text = "".join("01234+-*"[t] for t in s)
    assert all(c.isdigit() for c in text[0::2]) and all(not c.isdigit() for c in text[1::2])
    assert answer == [eval(text) % 5]


def check_cycle_navigation(length, s, answer, full):
    assert answer == [sum({0: -1, 1: 0, 2: 1}[t] for t in s) % 5]


def check_stack_manipulation(length, s, answer, full):
    if length == 1:
        assert answer == [s[0], 2]
    else:
        n_stack = next(i for i, t in enumerate(s) if t >= 2) if any(t >= 2 for t in s) else len(s)
        assert 1 <= n_stack < length and all(t in (2, 3, 4) for t in s[n_stack:])
        stack = list(s[:n_stack])
        for action in s[n_stack:]:
            if action == 2 and stack:
                stack.pop()
            elif action in (3, 4):
                stack.append(action - 3)
        assert answer == stack[::-1] + [2]
    assert full == answer + [0] * (length + 1 - len(answer))


def check_reverse_string(length, s, answer, full):
    assert answer == s[::-1]


def check_modular_arithmetic_brackets(length, s, answer, full):
    text = "".join("01234+-()"[t] for t in s)
    assert len(text) == length and text.count("(") == text.count(")")
    assert answer == [eval(text) % 5]


def check_solve_equation(length, s, answer, full):
    if length < 3:
        assert s == [0] * length and answer == [0]
        return
    text = "".join("01234+-()x="[t] for t in s)
    lhs, rhs = text.split("=")
    assert text.count("x") == 1 and rhs.isdigit() and len(text) == length
    solutions = [v for v in range(5) if eval(lhs.replace("x", f"({v})")) % 5 == int(rhs)]
    assert solutions == answer


def check_duplicate_string(length, s, answer, full):
    assert answer == s + s


def check_missing_duplicate_string(length, s, answer, full):
    if length == 1:
        assert s == [1] and answer == [1]
        return
    half = length // 2
    assert s[2 * half:] == [3] * (length % 2) and s[:2 * half].count(2) == 1
    filled = [answer[0] if t == 2 else t for t in s[:2 * half]]
    assert filled[:half] == filled[half:]


def check_odds_first(length, s, answer, full):
    # 1-based s_1 s_3 … then s_2 s_4 …
    assert answer == [s[i - 1] for i in range(1, length + 1, 2)] + [s[i - 1] for i in range(2, length + 1, 2)]


def binary_operands(length, s):
    assert s.count(2) == 1
    split = s.index(2)
    n, m = s[:split], s[split + 1:]
    assert len(n) >= 1 and len(m) >= 1 and len(n) + len(m) == length - 1
    return little_endian_value(n), little_endian_value(m)


def check_binary_addition(length, s, answer, full):
    if length <= 2:
        assert 2 not in s and answer == little_endian(little_endian_value(s)) + [2]
    else:
        n, m = binary_operands(length, s)
        assert n >= 1 and m >= 1
        assert answer == little_endian(n + m) + [2]
    assert full == answer + [0] * (length + 1 - len(answer))


def check_binary_multiplication(length, s, answer, full):
    if length <= 2:
        assert 2 not in s and answer == [0] * (length - 1) + [2]
    else:
        n, m = binary_operands(length, s)
        assert n >= 1 and m >= 1
        assert answer == little_endian(n * m) + [2]
    assert full == answer + [0] * (length - len(answer))


def check_compute_sqrt(length, s, answer, full):
    number = int("".join(map(str, s)), 2)
    assert 1 <= number < 2**length
    width = (length + 1) // 2
    assert len(answer) == width and int("".join(map(str, answer)), 2) == math.isqrt(number)


def check_bucket_sort(length, s, answer, full):
    assert answer == sorted(s)


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_registry_lists_the_papers_fifteen_tasks_with_their_sizes():
    assert set(TASKS) == set(PAPER_SIZES) == set(CHECKS)
    assert sorted(LEVELS.values()).count("regular") == 4
    assert sorted(LEVELS.values()).count("context_free") == 4
    assert sorted(LEVELS.values()).count("context_sensitive") == 7
    for name, (n_symbols, n_classes) in PAPER_SIZES.items():
        assert VOCAB_SIZES[name] == n_symbols + 1 and N_CLASSES[name] == n_classes, name
    assert (TRAIN_MIN_LENGTH, TRAIN_MAX_LENGTH, TEST_MIN_LENGTH, TEST_MAX_LENGTH) == (1, 40, 41, 500)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_labels_match_an_independent_reference(name):
    for length, s, answer, full in examples(name):
        CHECKS[name](length, s, answer, full)


@pytest.mark.parametrize("name", ["binary_addition", "binary_multiplication", "compute_sqrt",
                                  "modular_arithmetic_brackets", "solve_equation"])
def test_labels_at_test_lengths_need_big_ints_and_deep_grammars(name):
    lengths = (TEST_MIN_LENGTH, 203, TEST_MAX_LENGTH)
    for length, s, answer, full in examples(name, lengths=lengths, seeds=(3,)):
        CHECKS[name](length, s, answer, full)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_layout_shapes_dtypes_and_mask(name):
    spec = TASKS[name]
    rng = np.random.default_rng(7)
    for length in LENGTHS:
        ex = spec.generate(rng, length)
        t = spec.sequence_length(length)
        n_in = spec.input_length(length)
        assert set(ex) == {"inputs", "targets", "mask"}
        assert ex["inputs"].shape == ex["targets"].shape == ex["mask"].shape == (t,)
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32 and ex["mask"].dtype == bool
        # Input symbols, then one blank per output position.
        assert np.all(ex["inputs"][:n_in] < spec.blank) and np.all(ex["inputs"][:n_in] >= 0)
        assert np.all(ex["inputs"][n_in:] == spec.blank) and spec.blank == spec.vocab_size - 1
        assert t - n_in == spec.output_length(length)
        # The mask never covers the input; it covers a leading run of the output positions.
        assert not ex["mask"][:n_in].any() and ex["mask"][n_in]
        counted = int(ex["mask"].sum())
        assert ex["mask"][n_in:n_in + counted].all()
        assert np.all((ex["targets"] >= 0) & (ex["targets"] < spec.n_classes))
        assert np.all(ex["targets"][:n_in] == 0)
        if name not in ("stack_manipulation", "binary_addition", "binary_multiplication"):
            assert counted == spec.output_length(length)


def test_output_lengths_follow_the_paper():
    expected = {
        "reverse_string": 57, "duplicate_string": 114, "odds_first": 57, "bucket_sort": 57,
        "compute_sqrt": 29, "stack_manipulation": 58, "binary_addition": 58, "binary_multiplication": 57,
    }
    for name, spec in TASKS.items():
        assert spec.output_length(57) == expected.get(name, 1), name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_for_a_seed(name):
    spec = TASKS[name]

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [spec.generate(rng, length) for length in (5, 12, 30)]

    first, again, other = draw(11), draw(11), draw(12)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other, strict=True))


def test_labels_are_not_constant():
    """A generator stuck on one class would pass the layout checks; the labels must vary."""
    rng = np.random.default_rng(5)
    for name, spec in TASKS.items():
        seen = {tuple(spec.generate(rng, 9)["targets"].tolist()) for _ in range(40)}
        assert len(seen) > 1, name
    counts = np.bincount([TASKS["cycle_navigation"].generate(rng, 20)["targets"][-1] for _ in range(200)],
                         minlength=5)
    assert counts.min() > 10


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bad_arguments_raise_naming_the_argument(name):
    generate = TASKS[name].generate
    rng = np.random.default_rng(0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="length"):
            generate(rng, bad)
    with pytest.raises(TypeError, match="length"):
        generate(rng, 2.0)
    with pytest.raises(TypeError, match="rng"):
        generate(np.random.RandomState(0), 3)


def test_sample_length_is_uniform_over_the_inclusive_range():
    rng = np.random.default_rng(0)
    draws = [sample_length(rng, 3, 6) for _ in range(400)]
    assert set(draws) == {3, 4, 5, 6}
    assert max(np.bincount(draws)[3:]) < 150
    assert [sample_length(np.random.default_rng(9)) for _ in range(3)] == [
        sample_length(np.random.default_rng(9)) for _ in range(3)]
    assert all(1 <= sample_length(rng) <= 40 for _ in range(50))
    with pytest.raises(ValueError, match="min_len"):
        sample_length(rng, 0, 5)
    with pytest.raises(ValueError, match="max_len"):
        sample_length(rng, 6, 5)
    with pytest.raises(TypeError, match="rng"):
        sample_length(None, 1, 5)


def test_collate_pads_to_fixed_shape_with_mask_false():
    rng = np.random.default_rng(0)
    spec = TASKS["reverse_string"]
    exs = [spec.generate(rng, n) for n in (2, 5, 3)]
    batch = collate(exs)
    assert sorted(batch) == ["inputs", "mask", "reset", "targets"]
    assert all(v.shape == (3, 10) for v in batch.values())
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == bool and batch["reset"].dtype == bool
    for row, ex in enumerate(exs):
        n = ex["inputs"].size
        np.testing.assert_array_equal(batch["inputs"][row, :n], ex["inputs"])
        np.testing.assert_array_equal(batch["targets"][row, :n], ex["targets"])
        np.testing.assert_array_equal(batch["mask"][row, :n], ex["mask"])
        assert not batch["mask"][row, n:].any() and not batch["inputs"][row, n:].any()
    np.testing.assert_array_equal(batch["reset"], np.arange(10)[None].repeat(3, 0) == 0)
    assert collate(exs, pad_to=12)["inputs"].shape == (3, 12)
    with pytest.raises(ValueError, match="pad_to"):
        collate(exs, pad_to=9)
    with pytest.raises(ValueError, match="examples"):
        collate([])


def test_chomsky_task_stream_is_a_pure_function_of_step_and_split():
    task = ChomskyTask(TASKS["bucket_sort"], batch_size=3, eval_lengths=(41, 60), pad_to=120)
    a, b = task.batch(4), task.batch(4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["inputs"].shape == (3, 120) and task.vocab_size == 6 and task.n_classes == 5
    blank = TASKS["bucket_sort"].blank
    for split, (low, high) in (("train", (1, 40)), ("eval", (41, 60))):
        for step in range(4):
            batch = task.batch(step, split)
            n_out = (batch["inputs"] == blank).sum(axis=1)  # one blank per input symbol here
            assert np.all(n_out == n_out[0]) and low <= n_out[0] <= high  # one length per batch
    assert not np.array_equal(task.batch(0, "train")["inputs"], task.batch(0, "eval")["inputs"])
    at = task.batch_at_length(0, 50)
    assert np.all((at["inputs"] == blank).sum(axis=1) == 50)
    np.testing.assert_array_equal(task.batch_at_length(0, 50)["inputs"], at["inputs"])
    assert not np.array_equal(task.batch_at_length(0, 51)["inputs"][:, :50], at["inputs"][:, :50])
    with pytest.raises(ValueError, match="pad_to"):
        ChomskyTask(TASKS["duplicate_string"], pad_to=100)
    with pytest.raises(ValueError, match="batch_size"):
        ChomskyTask(TASKS["duplicate_string"], batch_size=0)
    with pytest.raises(ValueError, match="split"):
        task.batch(0, "test")
