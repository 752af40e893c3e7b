"""Traces: file format round trip and validation, the chunked writer, synthetic generators, specs."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from eplb.errors import EPLBError
from eplb.metrics import balancedness
from eplb.placement import Placement
from eplb.traces import (
    FORMAT_VERSION,
    Trace,
    TraceWriter,
    drift,
    example_trace_path,
    hot_shift,
    load_trace,
    lognormal,
    synthetic_from_spec,
    zipf,
)


def _loads(steps=5, L=2, E=4, seed=0, dtype=torch.int64):
    return torch.randint(0, 50, (steps, L, E), generator=torch.Generator().manual_seed(seed)).to(dtype)


def _write_raw(path, header, load):
    np.savez(path, header=np.array(json.dumps(header)), load=load)


# ---------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_save_load_round_trip_keeps_loads_dtype_and_metadata(tmp_path, dtype):
    meta = {"model": "tiny-moe", "top_k": 2, "tokens_per_step": 16, "source": "unit test", "extra": [1, 2]}
    trace = Trace(_loads(dtype=dtype), meta)
    trace.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    assert back.loads.dtype == dtype
    assert torch.equal(back.loads, trace.loads)
    assert back.metadata == {**meta, "num_layers": 2, "num_logical": 4}
    assert (back.steps, back.num_layers, back.num_logical) == (5, 2, 4)


def test_file_is_a_plain_npz_with_a_json_header(tmp_path):
    Trace(_loads(), {"model": "m"}).save(tmp_path / "t.npz", compress=False)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as npz:
        header = json.loads(str(npz["header"][()]))
        assert npz["load"].shape == (5, 2, 4)
    assert header["format"] == "eplb.trace" and header["version"] == FORMAT_VERSION
    assert header["metadata"]["model"] == "m"


def test_total_sums_over_steps_in_float64():
    trace = Trace(_loads())
    assert trace.total().dtype == torch.float64
    assert torch.equal(trace.total(), trace.loads.sum(0).double())


@pytest.mark.parametrize(
    "loads, match",
    [
        (torch.zeros(3, 4), r"shape \[steps, num_layers, num_logical\]"),
        (torch.tensor([[[1, -2]]]), "negative count"),
        (torch.tensor([[[1.0, float("nan")]]]), "NaN or inf"),
        (torch.tensor([[[True, False]]]), "integer or float"),
    ],
)
def test_bad_loads_are_rejected(loads, match):
    with pytest.raises(EPLBError, match=match):
        Trace(loads)


def test_metadata_must_match_the_shape_and_be_json():
    with pytest.raises(EPLBError, match="num_logical=5"):
        Trace(_loads(), {"num_logical": 5})
    with pytest.raises(EPLBError, match="JSON"):
        Trace(_loads(), {"model": object()})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EPLBError, match="does not exist"):
        Trace.load(tmp_path / "nope.npz")


def test_unknown_version_is_rejected(tmp_path):
    header = {"format": "eplb.trace", "version": 99, "metadata": {}}
    _write_raw(tmp_path / "t.npz", header, np.zeros((1, 1, 2)))
    with pytest.raises(EPLBError, match="format version 99"):
        Trace.load(tmp_path / "t.npz")


@pytest.mark.parametrize(
    "header, load, match",
    [
        ({"format": "other", "version": 1}, np.zeros((1, 1, 2)), "not an eplb trace"),
        ({"format": "eplb.trace", "version": 1}, np.zeros((3, 2)), "shape"),
        ({"format": "eplb.trace", "version": 1}, -np.ones((1, 1, 2)), "negative"),
        ({"format": "eplb.trace", "version": 1}, np.full((1, 1, 2), np.inf), "NaN or inf"),
        ({"format": "eplb.trace", "version": 1, "metadata": {"num_layers": 3}}, np.zeros((1, 1, 2)),
         "num_layers=3"),
    ],
)
def test_corrupt_files_are_rejected(tmp_path, header, load, match):
    _write_raw(tmp_path / "t.npz", header, load)
    with pytest.raises(EPLBError, match=match):
        Trace.load(tmp_path / "t.npz")


def test_files_that_are_not_traces_are_rejected(tmp_path):
    (tmp_path / "t.npz").write_text("{}")
    with pytest.raises(EPLBError, match="not an .npz file"):
        Trace.load(tmp_path / "t.npz")
    np.savez(tmp_path / "u.npz", x=np.zeros(3))
    with pytest.raises(EPLBError, match="expected 'header'"):
        Trace.load(tmp_path / "u.npz")
    with pytest.raises(EPLBError, match="is a directory"):
        Trace.load(tmp_path)


# ---------------------------------------------------------------------------------------- writer
def test_writer_round_trip_and_cleanup(tmp_path):
    loads = _loads(steps=10)
    path = tmp_path / "rec.npz"
    with TraceWriter(path, {"model": "m", "top_k": 2}, chunk_steps=3) as writer:
        for step in loads:
            writer.append(step)
        assert len(list((tmp_path / "rec.npz.chunks").glob("chunk_*.npz"))) == 3  # 9 steps flushed
    back = Trace.load(path)
    assert torch.equal(back.loads, loads)
    assert back.metadata["model"] == "m" and back.metadata["num_logical"] == 4
    assert not (tmp_path / "rec.npz.chunks").exists()


def test_interrupted_writer_is_readable_up_to_the_last_flushed_chunk(tmp_path, caplog):
    loads = _loads(steps=8)
    path = tmp_path / "rec.npz"
    writer = TraceWriter(path, {"model": "m"}, chunk_steps=3)
    for step in loads:
        writer.append(step.numpy())
    # No close(): as after a crash. A half-written temporary file must be ignored.
    (tmp_path / "rec.npz.chunks" / ".chunk_000002.npz.123.abcd.tmp").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="eplb"):
        back = Trace.load(path)
    assert torch.equal(back.loads, loads[:6])
    assert "not closed" in caplog.text
    assert torch.equal(Trace.load(tmp_path / "rec.npz.chunks").loads, loads[:6])
    with pytest.raises(EPLBError, match="already exists"):
        TraceWriter(path)


def test_killed_process_loses_at_most_the_last_chunk(tmp_path):
    path = tmp_path / "rec.npz"
    code = textwrap.dedent(f"""
        import os, torch
        from eplb.traces import TraceWriter
        w = TraceWriter({str(path)!r}, {{"source": "killed"}}, chunk_steps=4)
        for t in range(11):
            w.append(torch.full((2, 3), t))
        os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()
    back = Trace.load(path)
    assert back.steps == 8 and back.metadata["source"] == "killed"
    assert back.loads[:, 0, 0].tolist() == list(range(8))


def test_writer_rejects_bad_appends(tmp_path):
    writer = TraceWriter(tmp_path / "a.npz", {"num_layers": 2}, chunk_steps=2)
    with pytest.raises(EPLBError, match="num_layers=2"):
        writer.append(torch.zeros(3, 4))
    writer.append(torch.zeros(2, 4))
    with pytest.raises(EPLBError, match="earlier steps"):
        writer.append(torch.zeros(2, 5))
    with pytest.raises(EPLBError, match="negative"):
        writer.append(-torch.ones(2, 4))
    with pytest.raises(EPLBError, match="NaN"):
        writer.append(np.full((2, 4), np.nan))
    writer.append(torch.ones(2, 4))
    assert writer.close().loads[:, 0, 0].tolist() == [0, 1]
    with pytest.raises(EPLBError, match="closed"):
        writer.append(torch.zeros(2, 4))
    with pytest.raises(EPLBError, match="chunk_steps"):
        TraceWriter(tmp_path / "b.npz", chunk_steps=0)


def test_writer_copies_the_appended_tensor(tmp_path):
    counter = torch.zeros(1, 2, dtype=torch.int64)
    with TraceWriter(tmp_path / "a.npz", chunk_steps=10) as writer:
        for t in range(3):
            counter.fill_(t)  # a tracker reuses its counter in place
            writer.append(counter)
    assert Trace.load(tmp_path / "a.npz").loads[:, 0, 0].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------- generators
GENERATORS = [
    (lognormal, {"sigma": 1.0}),
    (zipf, {"alpha": 1.2}),
    (drift, {"sigma": 1.0, "drift_sigma": 0.1}),
    (hot_shift, {"sigma": 1.0, "shift_steps": (10,)}),
]


@pytest.mark.parametrize("gen, kw", GENERATORS, ids=lambda g: getattr(g, "__name__", ""))
def test_generators_are_seeded_and_reproducible(gen, kw):
    a = gen(20, 3, 16, tokens_per_step=64, top_k=2, seed=1, **kw)
    b = gen(20, 3, 16, tokens_per_step=64, top_k=2, seed=1, **kw)
    c = gen(20, 3, 16, tokens_per_step=64, top_k=2, seed=2, **kw)
    assert torch.equal(a.loads, b.loads)
    assert not torch.equal(a.loads, c.loads)
    # Every step routes exactly tokens * top_k picks per layer.
    assert (a.loads.sum(-1) == 128).all()
    assert a.loads.shape == (20, 3, 16)


@pytest.mark.parametrize("gen, kw", GENERATORS, ids=lambda g: getattr(g, "__name__", ""))
def test_generated_source_spec_regenerates_the_same_trace(gen, kw):
    trace = gen(20, 3, 16, tokens_per_step=64, top_k=2, seed=5, **kw)
    again = synthetic_from_spec(trace.metadata["source"])
    assert torch.equal(trace.loads, again.loads)


def test_lognormal_sigma_1_gives_about_2_4_max_over_mean_on_32_ranks():
    # 256 experts on 32 ranks, no redundant slot, the initial (in-order) placement.
    # Over many layers the mean per-layer max/mean rank load is ~2.4 (DeepSeek-R1 reported 2.56).
    L, E, G = 128, 256, 32
    trace = lognormal(4, L, E, sigma=1.0, tokens_per_step=2**16, top_k=8, seed=0)
    b = balancedness(trace.total(), Placement.initial(L, E, E, G), G)
    assert float(b.per_layer_imbalance.mean()) == pytest.approx(2.4, abs=0.2)
    flat = lognormal(4, L, E, sigma=0.0, tokens_per_step=2**16, top_k=8, seed=0)
    assert balancedness(flat.total(), Placement.initial(L, E, E, G), G).imbalance < 1.1


def test_zipf_popularity_follows_the_power_law():
    trace = zipf(50, 2, 32, alpha=1.0, tokens_per_step=4096, top_k=4, seed=0)
    share = trace.total()[0].sort(descending=True).values
    share = share / share.sum()
    expect = 1.0 / torch.arange(1, 33, dtype=torch.float64)
    expect = expect / expect.sum()
    assert torch.allclose(share, expect, atol=0.01)


def test_hot_shift_changes_which_experts_are_hot_and_drift_decorrelates():
    shifted = hot_shift(200, 4, 64, sigma=1.0, shift_steps=(100,), seed=0)
    before, after = shifted.loads[:100].sum(0).double(), shifted.loads[100:].sum(0).double()
    corr_shift = np.corrcoef(before.log1p().flatten(), after.log1p().flatten())[0, 1]
    steady = lognormal(200, 4, 64, sigma=1.0, seed=0).loads.double()
    halves = steady[:100].sum(0).log1p().flatten(), steady[100:].sum(0).log1p().flatten()
    corr_steady = np.corrcoef(*halves)[0, 1]
    assert corr_steady > 0.95 and corr_shift < 0.5
    # Slow drift: neighbouring windows stay similar, far-apart ones less so.
    d = drift(3000, 4, 64, sigma=1.0, drift_sigma=0.05, seed=0).loads.double()
    w = [d[i : i + 100].sum(0).log1p().flatten() for i in (0, 100, 2900)]
    assert np.corrcoef(w[0], w[1])[0, 1] > np.corrcoef(w[0], w[2])[0, 1] + 0.2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lognormal(0, 1, 16), "steps"),
        (lambda: lognormal(5, 1, 4, top_k=5), "top_k"),
        (lambda: lognormal(5, 1, 16, sigma=-1.0), "sigma"),
        (lambda: drift(5, 1, 16, sigma=0.1, drift_sigma=0.2), "drift_sigma"),
        (lambda: hot_shift(5, 1, 16, shift_steps=(5,)), "shift step 5"),
    ],
)
def test_generator_arguments_are_validated(call, match):
    with pytest.raises(EPLBError, match=match):
        call()


# ---------------------------------------------------------------------------------------- specs
def test_spec_matches_the_direct_call():
    spec = "synthetic:lognormal?steps=30&layers=2&experts=16&tokens=64&top_k=2&sigma=0.5&seed=3"
    direct = lognormal(30, 2, 16, sigma=0.5, tokens_per_step=64, top_k=2, seed=3)
    assert torch.equal(load_trace(spec).loads, direct.loads)
    shifted = synthetic_from_spec("synthetic:hot_shift?steps=30&layers=1&experts=8&top_k=2&shifts=10,20")
    assert shifted.metadata["source"].count("shifts=10,20") == 1


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lognormal?sigma=1", "must start with 'synthetic:'"),
        ("synthetic:gauss", "unknown kind 'gauss'"),
        ("synthetic:zipf?sigma=1", "unknown key 'sigma' for zipf"),
        ("synthetic:lognormal?steps=abc", "steps='abc' must be an integer"),
        ("synthetic:lognormal?steps=2.5", "must be an integer"),
        ("synthetic:lognormal?sigma=", "is not KEY=VALUE"),
        ("synthetic:hot_shift?shifts=1;2", "comma-separated integers"),
        ("synthetic:lognormal?experts=4&top_k=8", "top_k"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, match):
    with pytest.raises(EPLBError, match=match) as info:
        synthetic_from_spec(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("synthetic:lognormal?experts=0", r"experts \(0\) must be a positive integer"),
        ("synthetic:lognormal?layers=0", r"layers \(0\) must be a positive integer"),
        ("synthetic:zipf?tokens=0", r"tokens \(0\) must be a positive integer"),
        ("synthetic:lognormal?experts=4&top_k=8", r"top_k \(8\) must be <= experts \(4\)"),
        ("synthetic:hot_shift?sigma=0.5&drift=1", r"drift \(1.0\) must be <= sigma \(0.5\)"),
    ],
)
def test_a_bad_spec_value_is_named_by_the_key_the_user_wrote(spec, match):
    with pytest.raises(EPLBError, match=match) as info:
        synthetic_from_spec(spec)
    message = str(info.value)
    assert message.startswith(f"synthetic spec {spec!r}: ")
    assert not any(name in message for name in ("num_logical", "num_layers", "tokens_per_step", "drift_sigma"))


def test_bundled_example_trace_is_small_and_loads():
    assert example_trace_path().stat().st_size < 200_000
    trace = load_trace("example")
    assert (trace.steps, trace.num_layers, trace.num_logical) == (400, 4, 64)
    assert trace.metadata["source"].startswith("synthetic:hot_shift")


@pytest.mark.parametrize("gen, kw", GENERATORS, ids=lambda g: getattr(g, "__name__", ""))
def test_large_steps_keep_each_steps_total_exact(gen, kw):
    # 4096 tokens x top-8 over 64 experts: 512 picks per expert on average, the Gaussian sampler.
    trace = gen(300, 3, 64, tokens_per_step=4096, top_k=8, seed=3, **kw)
    assert (trace.loads.sum(-1) == 4096 * 8).all()
    assert (trace.loads >= 0).all()


def test_gaussian_counts_have_the_multinomial_mean_and_covariance():
    from eplb.traces import _sample_counts

    rng = np.random.default_rng(0)
    p_E = rng.lognormal(0.0, 1.0, 32)
    p_E /= p_E.sum()
    picks = 32 * 512
    counts_XE = _sample_counts(rng, picks, np.broadcast_to(p_E, (20000, 32)).copy()).astype(np.float64)
    assert (counts_XE.sum(1) == picks).all()
    mean_E = picks * p_E
    var_E = picks * p_E * (1 - p_E)
    # Standard errors over 20,000 rows: mean ~ sqrt(var / 20000), variance ~ var * sqrt(2 / 20000).
    assert np.abs(counts_XE.mean(0) - mean_E).max() < 5 * np.sqrt(var_E / 20000).max() + 0.5
    assert np.allclose(counts_XE.var(0), var_E, rtol=0.06)
    cov = np.cov(counts_XE[:, :2].T)[0, 1]
    assert cov == pytest.approx(-picks * p_E[0] * p_E[1], abs=0.1 * np.sqrt(var_E[0] * var_E[1]))
