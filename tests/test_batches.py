"""Training batches: arrays read from disk by rows (shards, float16, bfloat16), streamed
epochs that cover every row once in a shuffled order with bounded memory, exact
mid-epoch resumption, gradient accumulation, and the errors a bad file gets."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from aefast.batches import StreamedBatches, open_training_data
from aefast.cli import main
from aefast.data import ArrayFile

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_bfloat16(path, x: torch.Tensor):
    """As ml_dtypes (JAX) saves bfloat16: a 2-byte void dtype."""
    np.save(path, x.bfloat16().view(torch.int16).numpy().view("V2"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_array_file_reads_rows_across_shards(tmp_path, dtype):
    x = torch.randn(101, 2, 3, 3).to(dtype)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, (start, stop) in enumerate([(0, 40), (40, 40), (40, 77), (77, 101)]):  # an empty shard too
        if dtype == torch.bfloat16:
            _save_bfloat16(folder / f"part{i:02d}.npy", x[start:stop])
        else:
            np.save(folder / f"part{i:02d}.npy", x[start:stop].numpy())
    array = ArrayFile(folder)
    assert (array.rows, array.dim, array.image_shape) == (101, 18, (2, 3, 3))
    for start, stop in [(0, 101), (35, 81), (40, 41), (100, 101), (7, 7)]:
        rows = array.read(start, stop)
        assert rows.dtype == dtype and torch.equal(rows, x[start:stop].reshape(-1, 18))
    out = torch.empty(46, 18, dtype=dtype)
    assert array.read(35, 81, out=out) is out and torch.equal(out, x[35:81].reshape(-1, 18))
    with pytest.raises(IndexError, match=r"rows \[90, 102\) outside the 101 rows"):
        array.read(90, 102)


def test_array_file_refuses_what_it_cannot_read_in_place(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.random.rand(10, 4).astype(np.float32)))
    with pytest.raises(ValueError, match="Fortran order"):
        ArrayFile(tmp_path / "f.npy")
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="b.npy: rows of shape \\(5,\\) and dtype float32, but a.npy has"):
        ArrayFile(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .npy shards"):
        ArrayFile(tmp_path / "empty")
    np.save(tmp_path / "no_columns.npy", np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"no_columns.npy: rows of shape \(0,\) hold no values"):
        ArrayFile(tmp_path / "no_columns.npy")
    np.save(tmp_path / "big_endian.npy", np.zeros((3, 4), ">f4"))
    with pytest.raises(ValueError, match="big_endian.npy: the array's bytes are in big-endian order"):
        ArrayFile(tmp_path / "big_endian.npy")


def test_array_file_reads_an_activations_folder_in_its_manifests_order(tmp_path):
    """`aefast activations` lists its shards in the manifest: read in that order (name
    order breaks past shard99999), and a folder that no longer matches it is refused."""
    from aefast.activations import FORMAT, MANIFEST, MANIFEST_KEYS

    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float16)
    names = ["shard100000.npy", "shard99999.npy"][::-1]  # written in this order; name order is the reverse
    np.save(tmp_path / names[0], x[:10])
    np.save(tmp_path / names[1], x[10:])
    about = dict.fromkeys(MANIFEST_KEYS) | {"format": FORMAT, "tokens": 30, "shards": names}
    (tmp_path / MANIFEST).write_text(json.dumps(about))
    assert torch.equal(ArrayFile(tmp_path).read(0, 30), torch.from_numpy(x))
    (tmp_path / MANIFEST).write_text(json.dumps(about | {"tokens": 31}))
    with pytest.raises(ValueError, match="its shards hold 30 rows, its manifest says 31"):
        ArrayFile(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(about | {"shards": [*names, "shard100001.npy"]}))
    with pytest.raises(ValueError, match="its manifest lists shards that are not there \\(shard100001.npy\\)"):
        ArrayFile(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({k: v for k, v in about.items() if k != "tokens"}))
    with pytest.raises(ValueError, match="manifest.json: the manifest lacks tokens"):
        ArrayFile(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "another tool's", "shards": ["gone.npy"]}))
    assert ArrayFile(tmp_path).rows == 30  # not ours: the folder's .npy files, as for any folder
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: unreadable manifest"):
        ArrayFile(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros((100, 4), np.float32))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="ends before the 100 rows its header announces"):
        ArrayFile(tmp_path / "short.npy")
    with pytest.raises(OSError, match="no such file or folder"):
        ArrayFile(tmp_path / "absent.npy")


def _stream(tmp_path, rows=1000, dim=6, batch_size=64, window_rows=120):
    x = torch.randn(rows, dim).half()
    x[:, 0] = torch.arange(rows)  # a row's identity, exact in float16 up to 2048
    np.save(tmp_path / "x.npy", x.numpy())
    return x, StreamedBatches(ArrayFile(tmp_path / "x.npy"), rows - 37, batch_size, window_rows)


def test_a_streamed_epoch_is_every_training_row_once_in_a_shuffled_order(tmp_path):
    x, stream = _stream(tmp_path)
    generator = torch.Generator().manual_seed(5)
    epochs = [list(stream.epoch(generator)) for _ in range(2)]
    train = x[:stream.rows].float()
    for batches in epochs:
        assert all(b.dtype == torch.float32 and b.shape == (64, 6) for b in batches[:-1])
        assert len(batches[-1]) == stream.rows - 64 * (len(batches) - 1)
        seen = torch.cat(batches)
        assert torch.equal(seen[seen[:, 0].argsort()], train)
        assert not torch.equal(seen, train)  # shuffled
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # a new order each epoch
    assert stream.largest_window_rows <= stream.window_rows < stream.rows  # the file never all in memory


def test_a_streamed_epoch_resumes_at_any_batch(tmp_path):
    _, stream = _stream(tmp_path)
    generator = torch.Generator().manual_seed(9)
    start = generator.get_state()
    whole = list(stream.epoch(generator))
    for skip in (1, 2, 7, len(whole) - 1, len(whole)):
        generator.set_state(start)
        resumed = list(stream.epoch(generator, skip=skip))
        assert len(resumed) == len(whole) - skip
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole[skip:]))


def test_the_reader_stops_when_the_consumer_does(tmp_path):
    _, stream = _stream(tmp_path)
    import threading

    for _ in zip(range(2), stream.epoch(torch.Generator())):
        pass
    assert not any(t.name == "aefast-batch-reader" for t in threading.enumerate())


def test_resident_memory_stays_bounded_on_a_file_larger_than_the_buffer(tmp_path):
    """A 128 MiB float16 file (256 MiB as float32) streamed with a 4 MiB buffer: the
    process's peak resident memory grows by far less than the file (in a fresh process,
    so that nothing else this test run allocated is counted)."""
    rows, dim = 131072, 512
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
    for start in range(0, rows, 16384):
        array[start:start + 16384] = np.random.default_rng(start).standard_normal((16384, dim), np.float32)
    array.flush()
    del array
    script = textwrap.dedent(f"""
        import torch
        from aefast.batches import open_training_data

        def peak_mib():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

        torch.set_num_threads(1)
        data, batches = open_training_data({str(tmp_path / "big.npy")!r}, 0.01, 0, 1024, 4, torch.device("cpu"))
        before, rows, total = peak_mib(), 0, torch.zeros(())
        for batch in batches.epoch(torch.Generator().manual_seed(0)):
            rows += len(batch)
            total += batch.sum()
        print(rows, batches.rows, peak_mib() - before, batches.largest_window_rows, batches.window_rows)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    rows_read, train_rows, growth_mib, largest, window = out.split()
    assert int(rows_read) == int(train_rows) == rows - 512  # 1% held out, at most a quarter of the buffer
    assert int(largest) <= int(window) == 4 * 2**20 // (dim * 2)
    assert float(growth_mib) < 48, f"resident memory grew by {growth_mib} MiB on a 128 MiB file"


def test_streamed_data_holds_out_its_last_rows(tmp_path):
    x = torch.rand(300, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    data, batches = open_training_data(str(tmp_path / "x.npy"), 0.1, 0, 32, 1, torch.device("cpu"))
    assert torch.equal(data.val, x[270:]) and batches.rows == 270 and data.image_shape == (1, 4, 4)
    assert torch.equal(data.train, x[:270])  # the training sample (here all of it) for the evaluation
    np.save(tmp_path / "wide.npy", np.random.rand(40, 2**16).astype(np.float32))  # 256 KiB rows
    data, batches = open_training_data(str(tmp_path / "wide.npy"), 0.5, 0, 4, 1, torch.device("cpu"))
    assert len(data.val) == len(data.train) == 1 and batches.rows == 39  # each at most a quarter of the buffer
    assert batches.window_rows == 8
    np.save(tmp_path / "nan.npy", np.full((10, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        open_training_data(str(tmp_path / "nan.npy"), 0.2, 0, 4, 1, torch.device("cpu"))


def _interrupt_after(monkeypatch, steps: int):
    """Ctrl-C arriving during training step `steps` (1-based)."""
    from aefast.models.base import AutoencoderModel

    calls = {"n": 0}
    original = AutoencoderModel.train_step

    def step(self, batches, optimizers):
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)  # handled after this step ends
        return original(self, batches, optimizers)

    monkeypatch.setattr(AutoencoderModel, "train_step", step)


@pytest.mark.parametrize("model, data, flags", [
    ("topk-sae", "stream", ["--grad-accum", "2", "--k", "4", "--n-latents", "48", "--dead-steps", "3"]),
    ("gsn", "npz", ["--walkback", "1"]),  # in memory; noise ops drawing from torch's generator
])
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys, model, data, flags):
    x = torch.rand(1400, 2048 if data == "stream" else 16)  # streamed: 8 KiB rows, windows of 128 rows
    path = tmp_path / ("x.npy" if data == "stream" else "x.npz")
    np.save(path, x.numpy()) if data == "stream" else np.savez(path, x=x.numpy())
    common = [model, "--data", str(path), "--batch-size", "32", "--epochs", "2", "--buffer-mib", "1", *flags]
    assert main(["train", *common, "--out", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 7)  # mid-way through the first epoch (18 or 35 steps)
        assert main(["train", *common, "--out", str(tmp_path / "resumed")]) == 130
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    rows_per_step = 32 * (2 if "--grad-accum" in flags else 1)
    assert checkpoint["history"] == [] and checkpoint["position"]["rows"] == 7 * rows_per_step
    capsys.readouterr()
    assert main(["train", model, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert f"{7 * rows_per_step} rows into epoch 1" in capsys.readouterr().out

    def curve(run):
        return [(r["train"], r["val"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert curve("resumed") == curve("straight")
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"]
                         for run in ("straight", "resumed"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_checkpoints_are_written_mid_epoch_when_due(tmp_path, monkeypatch):
    from aefast.train import loop

    positions = []
    save = loop._save_checkpoint

    def recording(*args):
        positions.append(args[-1].rows)
        save(*args)

    monkeypatch.setattr(loop, "_save_checkpoint", recording)
    np.save(tmp_path / "x.npy", np.random.rand(200, 16).astype(np.float32))
    assert main(["train", "ae", "--data", str(tmp_path / "x.npy"), "--batch-size", "50", "--epochs", "1",
                 "--checkpoint-minutes", "0", "--out", str(tmp_path / "run")]) == 0
    assert positions == [50, 100, 150, 0]  # 160 training rows: after each step but the last, then the epoch's end


def test_data_parallel_accumulation_averages_the_gradients_once_a_step():
    import contextlib

    from aefast.models import Autoencoder

    model = Autoencoder(20, layers=[12, 4])
    deferred = []

    class DataParallelLoss:  # what train_step uses of DistributedDataParallel
        def __call__(self, x):
            return model.loss(x)

        @contextlib.contextmanager
        def no_sync(self):
            deferred.append(True)
            yield

    batches = [torch.rand(8, 20) for _ in range(3)]
    model.train_step(batches, {"model": torch.optim.SGD(model.parameters(), lr=0.1)}, loss=DataParallelLoss())
    assert len(deferred) == 2  # the all-reduce with the last batch only


def test_gradient_accumulation_is_the_step_on_the_joined_batch():
    from aefast.models import Autoencoder

    x = torch.rand(48, 20, dtype=torch.float64)
    models = [Autoencoder(20, layers=[12, 4]).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = [p.clone() for p in models[0].parameters()]
    optimizers = [{"model": torch.optim.SGD(m.parameters(), lr=0.1)} for m in models]
    whole = models[0].train_step(x, optimizers[0])
    parts = models[1].train_step([x[:30], x[30:]], optimizers[1])  # unequal parts: weighted by rows
    for name, value in whole.items():
        torch.testing.assert_close(parts[name], value)
    for a, b, start in zip(models[0].parameters(), models[1].parameters(), before):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, start)


def test_gradient_accumulation_is_refused_where_a_batch_takes_several_steps(tmp_path, capsys):
    assert main(["train", "aae", "--grad-accum", "2", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--grad-accum: aae takes several optimizer steps per batch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
