"""The Chomsky-hierarchy, passkey and listops tfds builders: records, content rules, lookup, bad input.

The Chomsky records are compared with the task generators called directly on the example's seeded
generator (``zoo.data.chomsky`` is tested on its own in test_chomsky.py). Passkey examples are parsed
back token by token, and every ListOps label is recomputed by a recursive evaluator written here.
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data.listops.builder as listops_builder
from zoo.data import CHOMSKY_TASKS, TASKS
from zoo.data.chomsky import TASKS as SPECS
from zoo.data.chomsky.builder import ChomskyConfig, ChomskyHierarchy, chomsky_example, input_length
from zoo.data.listops import ListOps, ListOpsConfig, listops_example
from zoo.data.passkey import Passkey, PasskeyConfig, passkey_example
from zoo.data.tfds_task import TfdsTask, example_rng, generate_example, record_indices

SIZES = dict(train_size=8, eval_size=4)
EVAL_LENGTHS = dict(min_eval_length=41, max_eval_length=60)      # the paper's 41..500, cut short for speed
PASSKEY = PasskeyConfig(sequence_length=40, eval_sequence_length=64, n_digits=3, n_filler_tokens=5, **SIZES)
LISTOPS = ListOpsConfig(max_depth=4, max_args=4, min_tokens=10, max_tokens=60, **SIZES)


def chomsky_config(name, **fields):
    return ChomskyConfig(task=name, **SIZES, **EVAL_LENGTHS, **fields)


def read_all(builder):
    builder.download_and_prepare()
    sources = {split: builder.as_data_source(split=split) for split in ("train", "eval")}
    return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every Chomsky task, passkey and listops built once: (data_dir, {name: {split: records}})."""
    data_dir = tmp_path_factory.mktemp("tfds")
    records = {name: read_all(ChomskyHierarchy(config=chomsky_config(name), data_dir=data_dir))
               for name in CHOMSKY_TASKS}
    records["passkey"] = read_all(Passkey(config=PASSKEY, data_dir=data_dir))
    records["listops"] = read_all(ListOps(config=LISTOPS, data_dir=data_dir))
    return data_dir, records


# --- Chomsky hierarchy ----------------------------------------------------------------------------

def test_the_fifteen_tasks_of_the_paper_are_registered():
    assert set(CHOMSKY_TASKS) == set(SPECS) and len(CHOMSKY_TASKS) == 15
    assert {"parity_check", "even_pairs", "modular_arithmetic_brackets", "binary_multiplication",
            "bucket_sort", "compute_sqrt"} <= set(CHOMSKY_TASKS)


def test_default_lengths_are_the_papers():
    config = ChomskyConfig()
    assert config.lengths("train") == (1, 40) and config.lengths("eval") == (41, 500)
    # duplicate_string at length 500: 500 symbols, then 1000 output blanks.
    assert ChomskyConfig(task="duplicate_string").max_length("eval") == 1500
    assert ChomskyConfig(task="parity_check").max_length("train") == 41


@pytest.mark.parametrize("name", CHOMSKY_TASKS)
def test_chomsky_records_are_the_task_generator_at_a_sampled_length(built, name):
    _, records = built
    spec, config = SPECS[name], chomsky_config(name)
    for split, (low, high) in (("train", (1, 40)), ("eval", (41, 60))):
        assert len(records[name][split]) == config.split_size(split)
        for index, record in enumerate(records[name][split]):
            rng = example_rng(config.seed, split, index)
            length = int(rng.integers(low, high + 1))           # the length first, then the example
            expected = spec.generate(rng, length)
            assert record["index"] == index
            for key in ("inputs", "targets", "mask"):
                np.testing.assert_array_equal(record[key], expected[key])
            assert input_length(config, split, index) == length
            n_symbols = int(np.sum(record["inputs"] != spec.blank))
            assert n_symbols == spec.input_length(length)
            if split == "eval":                                  # longer than anything trained on
                assert n_symbols > 40
            assert len(record["inputs"]) <= config.max_length(split)
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", ["parity_check", "duplicate_string", "modular_arithmetic"])
def test_chomsky_batches_cover_the_longest_eval_example(built, name):
    data_dir, records = built
    task = TASKS[name](batch_size=3, data_dir=data_dir, **SIZES, **EVAL_LENGTHS)
    spec = SPECS[name]
    longest = max(spec.sequence_length(n) for n in range(41, 61))
    assert task.row_length("eval") == longest == task.config.max_length("eval")
    batch = task.batch(0, "eval")
    assert batch["inputs"].shape == (3, longest)
    indices = record_indices(task.config.seed, "eval", 0, 3, task.config.eval_size)
    for row, index in enumerate(indices):                        # each row: its record, then padding
        record = records[name]["eval"][index]
        n = len(record["inputs"])
        np.testing.assert_array_equal(batch["inputs"][row, :n], record["inputs"])
        np.testing.assert_array_equal(batch["mask"][row, :n], record["mask"])
        assert not batch["inputs"][row, n:].any() and not batch["mask"][row, n:].any()
    with pytest.raises(ValueError, match=f"length={longest - 1} is shorter than the longest eval"):
        TASKS[name](length=longest - 1, **SIZES, **EVAL_LENGTHS)


def test_chomsky_examples_are_deterministic_and_depend_on_seed_split_index():
    config = chomsky_config("reverse_string")
    first = generate_example(chomsky_example, config, "train", 3)
    again = generate_example(chomsky_example, chomsky_config("reverse_string"), "train", 3)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    others = [generate_example(chomsky_example, config, "train", 4),
              generate_example(chomsky_example, config, "eval", 3),
              generate_example(chomsky_example, chomsky_config("reverse_string", seed=1), "train", 3)]
    assert all(not np.array_equal(first["inputs"], other["inputs"]) for other in others)


# --- passkey --------------------------------------------------------------------------------------

def check_passkey(ex, config, split):
    """Parse an example back: filler, K, the key, filler, Q, blanks; return where the key sits."""
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    n, length = config.n_digits, {"train": config.sequence_length, "eval": config.eval_sequence_length}[split]
    assert len(inputs) == length
    (marker,) = np.flatnonzero(inputs == 10)                     # K, once
    key = inputs[marker + 1 : marker + 1 + n]
    assert ((key >= 0) & (key <= 9)).all()
    assert inputs[-n - 1] == 11 and (inputs[-n:] == 12).all()    # Q, then one blank per digit
    filler = np.concatenate([inputs[:marker], inputs[marker + 1 + n : -n - 1]])
    assert len(filler) == length - 2 * n - 2
    assert ((filler >= 13) & (filler < 13 + config.n_filler_tokens)).all()
    if not config.random_filler:                                 # one periodic text around the key
        np.testing.assert_array_equal(filler, 13 + np.arange(len(filler)) % config.n_filler_tokens)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(length - n, length))
    np.testing.assert_array_equal(targets[mask], key)
    assert not targets[~mask].any()
    return int(marker), tuple(key)


def test_passkey_records_hide_the_key_and_ask_for_it_at_the_end(built):
    _, records = built
    for split in ("train", "eval"):
        for index, record in enumerate(records["passkey"][split]):
            check_passkey(record, PASSKEY, split)
            expected = generate_example(passkey_example, PASSKEY, split, index)
            np.testing.assert_array_equal(record["inputs"], expected["inputs"])
    places = [check_passkey(r, PASSKEY, "train") for r in records["passkey"]["train"]]
    assert len({p for p, _ in places}) > 3 and len({k for _, k in places}) == len(places)   # depth, key vary


@pytest.mark.parametrize("depth, before", [(0, 0), (0.25, 8), (0.5, 16), (1, 32), (0.8, 26)])
def test_passkey_depth_sets_the_filler_before_the_key(depth, before):
    # sequence_length 40, 3 digits: 40 - 2 * 3 - 2 = 32 filler tokens, round(depth * 32) of them first.
    config = PasskeyConfig(sequence_length=40, n_digits=3, n_filler_tokens=5, depth=depth, **SIZES)
    for index in range(3):
        assert check_passkey(generate_example(passkey_example, config, "train", index), config, "train")[0] \
            == before


def test_passkey_random_filler_and_the_eval_length_sweep():
    config = PasskeyConfig(sequence_length=30, eval_sequence_length=90, n_digits=4, n_filler_tokens=6,
                           random_filler=True, depth=0.5, **SIZES)
    assert (config.vocab_size, config.n_classes) == (19, 10)
    assert (config.max_length("train"), config.max_length("eval")) == (30, 90)
    train = generate_example(passkey_example, config, "train", 0)
    evaluation = generate_example(passkey_example, config, "eval", 0)
    assert check_passkey(evaluation, config, "eval")[0] == 40     # round(0.5 * (90 - 10))
    check_passkey(train, config, "train")
    filler = evaluation["inputs"][evaluation["inputs"] >= 13]
    assert len(set(filler.tolist())) == 6 and not np.array_equal(filler[:6], filler[6:12])   # not periodic


# --- listops --------------------------------------------------------------------------------------

OPERATOR_NAMES = {10: "MIN", 11: "MAX", 12: "MED", 13: "SM"}
CLOSE = 14


def evaluate_listops(tokens):
    """(value, depth, [argument counts]) of a token list, by recursive descent; it must parse whole."""
    counts = []

    def node(at, depth):
        token = int(tokens[at])
        if token < 10:
            return token, at + 1, depth
        assert token in OPERATOR_NAMES
        args, at, deepest = [], at + 1, depth
        while tokens[at] != CLOSE:
            value, at, reached = node(at, depth + 1)
            args.append(value)
            deepest = max(deepest, reached)
        counts.append(len(args))
        ordered = sorted(args)
        middle = len(ordered) // 2
        value = {"MIN": ordered[0], "MAX": ordered[-1], "SM": sum(args) % 10,
                 "MED": ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2,
                 }[OPERATOR_NAMES[token]]
        return value, at + 1, deepest

    value, end, depth = node(0, 1)
    assert end == len(tokens)
    return value, depth, counts


def test_the_listops_evaluator_itself_on_hand_worked_expressions():
    # [MAX 2 9 [MIN 4 7 ] 0 ] = 9;  [SM 5 6 [MED 1 8 3 2 ] ] = (5 + 6 + 2) % 10 = 3 (median 2.5 -> 2)
    assert evaluate_listops([11, 2, 9, 10, 4, 7, 14, 0, 14])[:2] == (9, 3)    # digits of MIN: depth 3
    assert evaluate_listops([13, 5, 6, 12, 1, 8, 3, 2, 14, 14]) == (3, 3, [4, 3])
    assert listops_builder.apply_operator("MED", [1, 8, 3, 2]) == 2


def check_listops(ex, config):
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    assert config.min_tokens <= len(inputs) <= config.max_tokens
    value, depth, counts = evaluate_listops(inputs)
    assert depth <= config.max_depth and all(2 <= c <= config.max_args for c in counts)
    np.testing.assert_array_equal(np.flatnonzero(mask), [len(inputs) - 1])   # the answer at the last token
    assert targets[-1] == value and not targets[:-1].any()
    return value


def test_listops_records_are_labelled_with_the_value_of_their_expression(built):
    _, records = built
    for split in ("train", "eval"):
        for index, record in enumerate(records["listops"][split]):
            check_listops(record, LISTOPS)
            np.testing.assert_array_equal(record["inputs"],
                                          generate_example(listops_example, LISTOPS, split, index)["inputs"])
    drawn = [generate_example(listops_example, LISTOPS, "train", i) for i in range(150)]
    assert len({check_listops(ex, LISTOPS) for ex in drawn}) >= 6        # labels are not constant
    tokens = np.concatenate([ex["inputs"] for ex in drawn])
    assert set(OPERATOR_NAMES) <= set(tokens.tolist())            # all four operators occur


def test_listops_lra_defaults_give_lra_lengths():
    config = ListOpsConfig(**SIZES)
    assert (config.max_depth, config.max_args, config.min_tokens, config.max_tokens) == (10, 10, 501, 1999)
    assert (config.vocab_size, config.n_classes, config.max_length("eval")) == (15, 10, 1999)
    for index in range(3):
        check_listops(generate_example(listops_example, config, "train", index), config)


def test_listops_bounds_no_tree_can_meet_raise(monkeypatch):
    monkeypatch.setattr(listops_builder, "MAX_ATTEMPTS", 50)
    config = ListOpsConfig(max_depth=3, max_args=2, min_tokens=2, max_tokens=3, **SIZES)  # trees have 1, 4, …
    with pytest.raises(ValueError, match="min_tokens=2"):
        generate_example(listops_example, config, "train", 0)


# --- registry, determinism, bad input -------------------------------------------------------------

def test_tasks_lookup_by_name(built):
    data_dir, _ = built
    small = {"passkey": dict(sequence_length=40, n_digits=3), "listops": dict(max_depth=4, max_args=4,
             min_tokens=10, max_tokens=60), **{name: EVAL_LENGTHS for name in CHOMSKY_TASKS}}
    for name, fields in small.items():
        task = TASKS[name](batch_size=2, data_dir=data_dir, **SIZES, **fields)
        assert isinstance(task, TfdsTask) and task.name == name
        if name in SPECS:
            assert (task.vocab_size, task.n_classes) == (SPECS[name].vocab_size, SPECS[name].n_classes)
            assert task.config.task == name
    batch = TASKS["passkey"](batch_size=2, data_dir=data_dir, **SIZES, sequence_length=40, n_digits=3,
                             eval_sequence_length=64, n_filler_tokens=5).batch(1, "eval")
    assert batch["inputs"].shape == (2, 64) and batch["mask"].sum() == 6
    batch = TASKS["listops"](batch_size=2, data_dir=data_dir, **SIZES, max_depth=4, max_args=4,
                             min_tokens=10, max_tokens=60).batch(0)
    assert batch["inputs"].shape == (2, 60) and batch["mask"].sum() == 2
    assert "tensorflow" not in sys.modules


def test_importing_zoo_data_leaves_tensorflow_datasets_unimported():
    code = "import sys, zoo.data; assert 'tensorflow_datasets' not in sys.modules; print(len(zoo.data.TASKS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 17


@pytest.mark.parametrize("name, key, config", [
    ("chomsky_hierarchy", "odds_first", chomsky_config("odds_first")),
    ("passkey", "passkey", PASSKEY),
    ("listops", "listops", LISTOPS),
])
def test_tfds_data_source_by_builder_name_reads_the_same_records(built, name, key, config):
    data_dir, records = built
    source = tfds.data_source(name, split="eval", data_dir=data_dir,
                              builder_kwargs={"config": config, "file_format": "array_record"})
    assert len(source) == config.eval_size
    for index in range(config.eval_size):
        np.testing.assert_array_equal(source[index]["inputs"], records[key]["eval"][index]["inputs"])
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("cls, config", [
    (ChomskyHierarchy, chomsky_config("binary_addition")), (Passkey, PASSKEY), (ListOps, LISTOPS)])
def test_two_builds_write_identical_files(built, tmp_path, cls, config):
    first = cls(config=config, data_dir=built[0])
    again = cls(config=config, data_dir=tmp_path)
    again.download_and_prepare()
    def record_files(builder):
        return sorted(p.name for p in builder.data_path.iterdir() if "array_record" in p.name)

    names = record_files(first)
    assert len(names) == 2 and names == record_files(again)
    for name in names:
        assert (first.data_path / name).read_bytes() == (again.data_path / name).read_bytes()


@pytest.mark.parametrize("make, field", [
    (lambda: ChomskyConfig(task="parity"), "task"),
    (lambda: ChomskyConfig(min_train_length=0), "min_train_length"),
    (lambda: ChomskyConfig(min_train_length=5, max_train_length=4), "max_train_length"),
    (lambda: ChomskyConfig(min_eval_length=0), "min_eval_length"),
    (lambda: ChomskyConfig(max_eval_length=40), "max_eval_length"),
    (lambda: ChomskyConfig(seed=-1), "seed"),
    (lambda: TASKS["parity_check"](batch_size=0), "batch_size"),
    (lambda: TASKS["bucket_sort"](eval_size=0), "eval_size"),
    (lambda: PasskeyConfig(sequence_length=11, n_digits=5), "sequence_length"),
    (lambda: PasskeyConfig(eval_sequence_length=3), "eval_sequence_length"),
    (lambda: PasskeyConfig(depth=1.5), "depth"),
    (lambda: PasskeyConfig(depth=-0.1), "depth"),
    (lambda: PasskeyConfig(n_digits=0), "n_digits"),
    (lambda: PasskeyConfig(n_filler_tokens=0), "n_filler_tokens"),
    (lambda: TASKS["passkey"](sequence_length=64, length=32), "length"),
    (lambda: ListOpsConfig(max_depth=1), "max_depth"),
    (lambda: ListOpsConfig(max_args=1), "max_args"),
    (lambda: ListOpsConfig(min_tokens=0), "min_tokens"),
    (lambda: ListOpsConfig(min_tokens=50, max_tokens=40), "max_tokens"),
    (lambda: ListOpsConfig(max_depth=3, max_args=2, min_tokens=11, max_tokens=20), "min_tokens"),  # max is 10
])
def test_bad_configs_raise_value_errors_that_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_unknown_fields_raise_type_errors():
    # A task's own name is accepted back (the training CLI passes every config field); another is not.
    with pytest.raises(ValueError, match="task='even_pairs' contradicts"):
        TASKS["parity_check"](task="even_pairs")
    with pytest.raises(TypeError, match="n_digit"):
        TASKS["passkey"](n_digit=3)
