"""The tfds tasks: builds without TensorFlow, reproducible records and batches, the tasks' rules, packing."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from zoo.data import TASKS
from zoo.data.copy import Copy, CopyConfig, copy_example
from zoo.data.mqar import Mqar, MqarConfig, mqar_example
from zoo.data.pack import fit_count, pack, pad
from zoo.data.selective_copy import SelectiveCopy, SelectiveCopyConfig, selective_copy_example
from zoo.data.tfds_task import (
    DATA_DIR_ENV,
    SequenceConfig,
    TfdsTask,
    default_data_dir,
    generate_example,
    record_indices,
    require,
)

SIZES = dict(train_size=24, eval_size=12)
# Each builder with a tiny config; the copy config has an eval range longer than train's.
CASES = {
    "copy": (Copy, CopyConfig(n_symbols=5, min_copy_length=1, max_copy_length=6, eval_min_copy_length=7,
                              eval_max_copy_length=9, **SIZES)),
    "selective_copy": (SelectiveCopy, SelectiveCopyConfig(n_symbols=6, n_tokens=3, n_noise=9, **SIZES)),
    "mqar": (Mqar, MqarConfig(n_keys=8, n_values=6, n_pairs=4, n_queries=3, query_length=7, **SIZES)),
}


def example(*tokens, targets=None, mask=None):
    """A sequence whose targets default to its tokens + 100 and whose mask defaults to all True."""
    inputs = np.array(tokens, np.int32)
    return {"inputs": inputs,
            "targets": inputs + 100 if targets is None else np.array(targets, np.int32),
            "mask": np.ones(len(inputs), bool) if mask is None else np.array(mask, bool)}


def segments(batch):
    """The row pieces between consecutive resets, in row order (a row's last piece keeps its padding)."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        starts = list(np.flatnonzero(batch["reset"][row])) + [batch["inputs"].shape[1]]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            out.append({key: batch[key][row, a:b] for key in ("inputs", "targets", "mask")})
    return out


# --- packing -----------------------------------------------------------------------------------

def test_pack_lays_out_the_docstring_example_exactly():
    a, b, c = example(1, 2, 3), example(4, 5, mask=[False, True]), example(6, 7, 8, 9)
    batch = pack([a, b, c], length=6, rows=2)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(batch["targets"],
                                  [[101, 102, 103, 104, 105, 0], [106, 107, 108, 109, 0, 0]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["reset"], [[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == bool and batch["reset"].dtype == bool


def test_pack_opens_a_new_row_when_the_next_sequence_does_not_fit_and_leaves_spare_rows_empty():
    batch = pack([example(1, 2), example(3, 4, 5), example(6)], length=4, rows=3)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 0, 0], [3, 4, 5, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["reset"], [[1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    assert not batch["mask"][2].any()


def test_fit_count_is_how_many_leading_sequences_next_fit_places():
    assert fit_count([2, 3, 1], length=4, rows=3) == 3
    assert fit_count([2, 3, 1, 4], length=4, rows=2) == 3       # [2 _ _][3 1]; the 4 needs a third row
    assert fit_count([3, 2], length=4, rows=1) == 1
    assert fit_count([5], length=4, rows=9) == 0                 # longer than a row
    assert fit_count([], length=4, rows=1) == 0


@pytest.mark.parametrize("seed", range(3))
def test_packed_rows_read_back_as_the_examples_in_order(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8, size=20)
    examples = [example(*rng.integers(0, 50, size=n), mask=rng.random(n) < 0.5) for n in lengths]
    rows = 20
    batch = pack(examples, length=10, rows=rows)
    got = segments(batch)
    assert len(got) == len(examples)
    for seg, ex in zip(got, examples, strict=True):
        n = len(ex["inputs"])
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(seg[key][:n], ex[key])
        assert not seg["mask"][n:].any() and not seg["inputs"][n:].any()   # only padding after it
    assert batch["reset"].sum() == len(examples)


def test_pad_puts_one_example_per_row():
    batch = pad([example(1, 2), example(3)], length=3)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, 0], [3, 0, 0]])
    np.testing.assert_array_equal(batch["reset"], [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 0], [1, 0, 0]])


def test_packing_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="rows=1"):
        pack([example(1, 2), example(3, 4)], length=3, rows=1)
    with pytest.raises(ValueError, match=r"examples\[1\] has length 4"):
        pack([example(1), example(1, 2, 3, 4)], length=3, rows=5)
    with pytest.raises(ValueError, match="length 0"):
        pad([example()], length=3)
    with pytest.raises(ValueError, match="shapes"):
        pack([{"inputs": np.zeros(3), "targets": np.zeros(2), "mask": np.ones(3, bool)}], length=4, rows=1)
    with pytest.raises(ValueError, match="lacks"):
        pack([{"inputs": np.zeros(3)}], length=4, rows=1)
    with pytest.raises(ValueError, match="rows"):
        pack([], length=4, rows=0)


# --- builders: build, read back without TensorFlow, reproducible ----------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every case built once into a shared data_dir: {name: (builder, {split: records})}."""
    data_dir = tmp_path_factory.mktemp("tfds")
    out = {}
    for name, (cls, config) in CASES.items():
        builder = cls(config=config, data_dir=data_dir)
        builder.download_and_prepare()
        sources = {split: builder.as_data_source(split=split) for split in ("train", "eval")}
        out[name] = builder, {split: [src[i] for i in range(len(src))] for split, src in sources.items()}
    return data_dir, out


@pytest.mark.parametrize("name", CASES)
def test_records_are_the_generated_examples_read_back_without_tensorflow(built, name):
    data_dir, out = built
    builder, records = out[name]
    cls, config = CASES[name]
    assert builder.name == name
    assert str(builder.data_dir).startswith(str(data_dir))
    for split, size in (("train", config.train_size), ("eval", config.eval_size)):
        assert len(records[split]) == size
        for index, record in enumerate(records[split]):
            assert record["index"] == index            # stored in index order
            expected = generate_example(cls.generate, config, split, index)   # from (seed, split, index)
            for key in ("inputs", "targets", "mask"):
                np.testing.assert_array_equal(record[key], expected[key])
                assert record[key].dtype == expected[key].dtype
    assert "tensorflow" not in sys.modules


def test_tfds_data_source_by_name_reads_the_same_records(built):
    data_dir, out = built
    cls, config = CASES["mqar"]
    source = tfds.data_source("mqar", split="eval", data_dir=data_dir,
                              builder_kwargs={"config": config, "file_format": "array_record"})
    assert len(source) == config.eval_size
    for index in (0, config.eval_size - 1):
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(source[index][key], out["mqar"][1]["eval"][index][key])
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", CASES)
def test_two_builds_write_identical_files(built, tmp_path, name):
    data_dir, out = built
    cls, config = CASES[name]
    again = cls(config=config, data_dir=tmp_path)
    again.download_and_prepare()
    first = sorted(p for p in out[name][0].data_path.iterdir() if "array_record" in p.name)
    second = sorted(p for p in again.data_path.iterdir() if "array_record" in p.name)
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 2
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_examples_differ_across_indices_splits_and_seeds():
    config = CopyConfig(max_copy_length=12, **SIZES)
    first = generate_example(copy_example, config, "train", 0)["inputs"]
    assert not np.array_equal(first, generate_example(copy_example, config, "train", 1)["inputs"])
    assert not np.array_equal(first, generate_example(copy_example, config, "eval", 0)["inputs"])
    other = CopyConfig(max_copy_length=12, seed=1, **SIZES)
    assert not np.array_equal(first, generate_example(copy_example, other, "train", 0)["inputs"])
    assert other.name != config.name          # so they never share a directory


# --- the tasks' rules ---------------------------------------------------------------------------

def check_copy(ex, n_symbols, lengths):
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    (delim,) = np.flatnonzero(inputs == n_symbols)
    assert lengths[0] <= delim <= lengths[1] and len(inputs) == 2 * delim + 1
    assert (inputs[:delim] < n_symbols).all() and (inputs[delim + 1 :] == n_symbols + 1).all()
    np.testing.assert_array_equal(targets[delim + 1 :], inputs[:delim])   # after ▷: the string again
    np.testing.assert_array_equal(mask, np.arange(len(inputs)) > delim)


def check_selective_copy(ex, config):
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    region = inputs[: config.n_tokens + config.n_noise]
    assert len(inputs) == 2 * config.n_tokens + config.n_noise + 1
    assert inputs[len(region)] == config.n_symbols                          # the delimiter
    tokens = region[region != config.n_symbols + 1]                         # all but the noise, in order
    np.testing.assert_array_equal(targets[mask], tokens)
    assert len(tokens) == config.n_tokens
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(len(region) + 1, len(inputs)))
    return tuple(np.flatnonzero(region != config.n_symbols + 1))


def check_mqar(ex, config):
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    context, region = inputs[: 2 * config.n_pairs], inputs[2 * config.n_pairs :]
    keys, values = context[0::2], context[1::2]
    assert (keys < config.n_keys).all() and len(set(keys)) == config.n_pairs
    assert ((values >= config.n_keys) & (values < config.n_keys + config.n_values)).all()
    assert len(set(values)) == config.n_pairs
    paired = dict(zip(keys.tolist(), values.tolist(), strict=True))
    blank = config.n_keys + config.n_values
    assert not mask[: 2 * config.n_pairs].any() and len(region) == config.query_length
    asked = np.flatnonzero(mask)
    assert len(asked) == config.queries and len(set(inputs[asked])) == config.queries
    for t in asked:                                             # each query's target: its key's value
        assert targets[t] == paired[int(inputs[t])] - config.n_keys
    assert (region[~mask[2 * config.n_pairs :]] == blank).all()


def test_copy_targets_after_the_delimiter_are_the_string_before_it(built):
    _, out = built
    config = CASES["copy"][1]
    for split in ("train", "eval"):
        lengths = set()
        for ex in out["copy"][1][split]:
            check_copy(ex, config.n_symbols, config.copy_lengths(split))
            lengths.add(int(np.argmax(ex["inputs"] == config.n_symbols)))
        assert len(lengths) > 1                                  # lengths vary within the split
    assert config.copy_lengths("eval") == (7, 9) and config.max_length("eval") == 19


def test_selective_copy_targets_are_the_scattered_tokens_in_order(built):
    _, out = built
    config = CASES["selective_copy"][1]
    placements = {check_selective_copy(ex, config) for ex in out["selective_copy"][1]["train"]}
    assert len(placements) > 5                                   # the positions vary: what makes it selective


def test_mqar_each_query_target_is_the_value_paired_with_its_key(built):
    _, out = built
    config = CASES["mqar"][1]
    for split in ("train", "eval"):
        for ex in out["mqar"][1][split]:
            check_mqar(ex, config)


@pytest.mark.parametrize("seed", range(5))
def test_task_rules_hold_for_the_default_configs_too(seed):
    for index in range(4):
        rng = np.random.default_rng(seed * 10 + index)
        config = CopyConfig()
        check_copy(copy_example(rng, config, "train"), config.n_symbols, config.copy_lengths("train"))
        config = SelectiveCopyConfig()
        check_selective_copy(selective_copy_example(rng, config, "train"), config)
        check_mqar(mqar_example(rng, MqarConfig(), "train"), MqarConfig())


# --- TfdsTask: zoo's Task protocol on the data source ---------------------------------------------

def test_record_indices_visit_every_record_once_per_epoch():
    stream = np.concatenate([record_indices(3, "train", step, 4, 10) for step in range(5)])   # 2 epochs
    np.testing.assert_array_equal(np.sort(stream[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(stream[10:]), np.arange(10))
    assert not np.array_equal(stream[:10], stream[10:])          # each epoch has its own order
    np.testing.assert_array_equal(record_indices(3, "train", 2, 4, 10), stream[8:12])


@pytest.mark.parametrize("packed", [False, True])
def test_batches_are_a_function_of_the_step_alone(built, packed):
    data_dir, _ = built
    cls, config = CASES["copy"]
    first = TfdsTask(cls, config, batch_size=3, length=20, pack=packed, data_dir=data_dir)
    first.batch(5)                              # reading other batches first changes nothing
    second = TfdsTask(cls, config, batch_size=3, length=20, pack=packed, data_dir=data_dir)
    for step, split in ((0, "train"), (7, "train"), (2, "eval")):
        a, b = first.batch(step, split), second.batch(step, split)
        assert set(a) == {"inputs", "targets", "mask", "reset"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].shape == (3, 20)
    assert not np.array_equal(first.batch(0)["inputs"], first.batch(1)["inputs"])
    assert not np.array_equal(first.batch(0)["inputs"], first.batch(0, "eval")["inputs"])


def test_padded_batches_hold_one_checked_example_per_row(built):
    data_dir, _ = built
    cls, config = CASES["copy"]
    task = TfdsTask(cls, config, batch_size=4, data_dir=data_dir)
    assert (task.name, task.vocab_size, task.n_classes) == ("copy", 7, 5)
    for split in ("train", "eval"):
        batch = task.batch(1, split)
        assert batch["inputs"].shape == (4, config.max_length(split))
        np.testing.assert_array_equal(batch["reset"][:, 0], True)
        assert batch["reset"].sum() == 4
        for seg in segments(batch):
            n = 2 * int(np.argmax(seg["inputs"] == config.n_symbols)) + 1
            check_copy({k: v[:n] for k, v in seg.items()}, config.n_symbols, config.copy_lengths(split))


def test_packed_batches_fill_rows_with_whole_examples(built):
    data_dir, _ = built
    cls, config = CASES["copy"]
    task = TfdsTask(cls, config, batch_size=2, length=40, pack=True, data_dir=data_dir)
    batch = task.batch(3)
    assert batch["reset"].sum() > 4                   # several examples per row
    np.testing.assert_array_equal(batch["reset"][:, 0], True)
    for seg in segments(batch):
        n = 2 * int(np.argmax(seg["inputs"] == config.n_symbols)) + 1
        check_copy({k: v[:n] for k, v in seg.items()}, config.n_symbols, config.copy_lengths("train"))
        assert not seg["mask"][n:].any()
    # A row is closed only when the next drawn example (at most max_length long) does not fit in it.
    for row in range(2):
        last = np.flatnonzero(batch["reset"][row])[-1]
        used = last + 2 * int(np.argmax(batch["inputs"][row, last:] == config.n_symbols)) + 1
        assert 40 - config.max_length("train") < used <= 40


def test_tasks_registry_and_data_dir_env(built, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    task = TASKS["mqar"](batch_size=2, n_pairs=2, n_keys=4, n_values=4, query_length=3, **SIZES)
    assert isinstance(task, TfdsTask) and task.name == "mqar" and task.vocab_size == 9 and task.n_classes == 4
    batch = task.batch(0)
    assert batch["inputs"].shape == (2, 7)
    for ex in segments(batch):
        check_mqar(ex, MqarConfig(n_pairs=2, n_keys=4, n_values=4, n_queries=2, query_length=3))
    assert (tmp_path / "mqar" / task.config.name / "1.0.0").is_dir()
    assert {"copy", "selective_copy", "mqar"} <= set(TASKS)
    assert "tensorflow" not in sys.modules


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: CopyConfig(max_copy_length=0), "max_copy_length"),
    (lambda: CopyConfig(min_copy_length=0), "min_copy_length"),
    (lambda: CopyConfig(eval_min_copy_length=20, eval_max_copy_length=5), "eval_max_copy_length"),
    (lambda: CopyConfig(n_symbols=0), "n_symbols"),
    (lambda: CopyConfig(train_size=0), "train_size"),
    (lambda: CopyConfig(seed=-1), "seed"),
    (lambda: SelectiveCopyConfig(n_tokens=0), "n_tokens"),
    (lambda: SelectiveCopyConfig(n_noise=-1), "n_noise"),
    (lambda: MqarConfig(n_pairs=5, n_keys=4), "n_keys"),
    (lambda: MqarConfig(n_pairs=5, n_values=4), "n_values"),
    (lambda: MqarConfig(n_pairs=3, n_queries=4), "n_queries"),
    (lambda: MqarConfig(n_pairs=3, query_length=2), "query_length"),
    (lambda: TfdsTask(Copy, CopyConfig(max_copy_length=4), length=8), "length"),
    (lambda: TfdsTask(Copy, CopyConfig(), batch_size=0), "batch_size"),
    (lambda: TfdsTask(Copy, CopyConfig()).batch(-1), "step"),
    (lambda: TfdsTask(Copy, CopyConfig()).batch(0, "test"), "split"),
])
def test_bad_configs_raise_value_errors_that_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_wrong_types_and_unknown_fields_raise_type_errors():
    with pytest.raises(TypeError, match="config must be a CopyConfig"):
        TfdsTask(Copy, MqarConfig())
    with pytest.raises(TypeError, match="n_symbol"):
        TASKS["copy"](n_symbol=3)


def test_a_generator_that_breaks_its_config_is_caught_while_building():
    config = CopyConfig(n_symbols=3, max_copy_length=2)
    def token_too_big(rng, config, split):
        ex = copy_example(rng, config, split)
        return {**ex, "inputs": ex["inputs"] + config.vocab_size}

    def too_long(rng, config, split):
        return example(*np.zeros(config.max_length(split) + 1, int), targets=np.zeros(6, int))

    def class_too_big(rng, config, split):
        return example(0, 1, targets=[0, config.n_classes])

    with pytest.raises(ValueError, match="vocab_size=5"):
        generate_example(token_too_big, config, "train", 0)
    with pytest.raises(ValueError, match="max_length=5"):
        generate_example(too_long, config, "train", 0)
    with pytest.raises(ValueError, match="n_classes=3"):
        generate_example(class_too_big, config, "eval", 0)


def test_default_data_dir_is_the_env_var_else_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "zoo" / "tfds"
    assert Copy(config=CopyConfig()).data_dir.startswith(str(tmp_path / ".cache" / "zoo" / "tfds"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"


def test_config_names_stay_short_and_distinct():
    many = [CopyConfig(train_size=10**150 + k) for k in range(2)]
    assert all(len(c.name) == 200 for c in many) and many[0].name != many[1].name
    assert CopyConfig().name == ("seed=0,train_size=1024,eval_size=256,n_symbols=8,min_copy_length=1,"
                                 "max_copy_length=16,eval_min_copy_length=none,eval_max_copy_length=none")


def test_require_names_the_class_field_and_value():
    with pytest.raises(ValueError, match=r"SequenceConfig: train_size=0 must be at least 1"):
        SequenceConfig(train_size=0)
    require(CopyConfig(), True, "n_symbols", "unused")
