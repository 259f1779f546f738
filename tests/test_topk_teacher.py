"""Sparse top-k teachers (SPEC §1b): TopKTeacher, re-tempering, teacher caches and their CLI."""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from fastkd.logit import topk_teacher as tt
from fastkd.logit.topk_teacher import TopKTeacher, resolve_teacher_topk, retemper_logprobs
from fastkd import teacher_cache as tc

V = 50


def _teacher_rows(n, vocab, k, seed=0, scale=2.0):
    """Top-k (unsorted order: a random permutation of the top-k) of random distributions."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, -1)
    val, idx = lp.topk(k, -1)
    perm = torch.randperm(k, generator=g)
    return idx[:, perm], val[:, perm]


def _brute(lp, vocab, t_src, t):
    """Float64 reference: the full distribution with the residual spread evenly over the
    unlisted entries, tempered and renormalised; returns (listed logprobs, log bucket)."""
    lp = lp.double()
    n, k = lp.shape
    a = t_src / t
    r = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    p = torch.empty(n, vocab, dtype=torch.float64)
    p[:, :k] = lp.exp()
    if vocab > k:
        p[:, k:] = r / (vocab - k)
    w = p ** a
    q = w / w.sum(-1, keepdim=True)
    return q[:, :k].log(), q[:, k:].sum(-1).log()


@pytest.mark.parametrize("k", [1, 20, V])
@pytest.mark.parametrize("t_src,t", [(1.0, 2.0), (2.0, 0.5), (1.0, 0.7), (0.5, 4.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_retemper_matches_bruteforce(k, t_src, t, dtype):
    _, lp = _teacher_rows(6, V, k)
    lp = lp.to(dtype)
    out, log_res = retemper_logprobs(lp, V, t_src, t, return_log_residual=True)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == lp.shape and log_res.shape == lp.shape[:1]
    ref, ref_res = _brute(lp, V, t_src, t)  # on the (rounded) input values
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    if k == V:
        assert (log_res == -math.inf).all()
    else:
        torch.testing.assert_close(log_res.double(), ref_res, rtol=tol, atol=tol)
    # The residual the loss derives from the output is the re-tempered bucket.
    torch.testing.assert_close(1 - out.double().exp().sum(-1), ref_res.exp(), rtol=0,
                               atol=1e-6 if dtype != torch.float64 else 1e-12)


def test_retemper_leading_dims_and_bucket_direction():
    _, lp = _teacher_rows(12, V, 5)
    lp3 = lp.reshape(3, 4, 5)
    out = retemper_logprobs(lp3, V, 1.0, 2.0)
    torch.testing.assert_close(out.reshape(12, 5), retemper_logprobs(lp, V, 1.0, 2.0))
    # Flattening (T > T_src) moves mass to the bucket, sharpening moves it to the listed entries.
    listed = lp.exp().sum(-1)
    assert (retemper_logprobs(lp, V, 1.0, 2.0).exp().sum(-1) < listed).all()
    assert (retemper_logprobs(lp, V, 1.0, 0.5).exp().sum(-1) > listed).all()


def test_retemper_zero_and_tiny_residual():
    # r = 0 exactly: all the mass is listed -> bucket weight 0, the listed entries are tempered
    # among themselves.
    lp = torch.tensor([[0.0], [math.log(0.5)]], dtype=torch.float64)
    lp2 = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    out, res = retemper_logprobs(lp[:1], V, 1.0, 2.0, return_log_residual=True)
    assert out.item() == 0.0 and res.item() == -math.inf
    out, res = retemper_logprobs(lp2, V, 1.0, 3.0, return_log_residual=True)
    torch.testing.assert_close(out, torch.log_softmax(lp2 / 3.0, -1))
    assert res.item() == -math.inf
    # Listed probabilities summing past 1 by rounding: also an empty bucket, no NaN.
    over = torch.log(torch.tensor([[0.5, 0.5000001]]))
    out, res = retemper_logprobs(over, V, 1.0, 2.0, return_log_residual=True)
    assert torch.isfinite(out).all() and res.item() == -math.inf
    # Tiny r = 1e-12 (k = 1): log r from log1mexp keeps full relative precision.
    r = 1e-12
    l = math.log1p(-r)
    for t_src, t in [(1.0, 0.5), (1.0, 4.0)]:
        a = t_src / t
        out, res = retemper_logprobs(torch.tensor([[l]], dtype=torch.float64), V, t_src, t,
                                     return_log_residual=True)
        r_true = -math.expm1(l)
        lw_res = a * math.log(r_true) + (1 - a) * math.log(V - 1)
        norm = math.log(math.exp(a * l) + math.exp(lw_res))
        assert res.item() == pytest.approx(lw_res - norm, rel=1e-9)
        assert out.item() == pytest.approx(a * l - norm, rel=1e-9, abs=1e-15)
    # A row with no listed mass (all -inf, e.g. padding) keeps everything in the bucket.
    out, res = retemper_logprobs(torch.full((1, 3), -math.inf), V, 1.0, 2.0,
                                 return_log_residual=True)
    assert (out == -math.inf).all() and res.item() == 0.0


def test_same_temperature_is_identity():
    idx, lp = _teacher_rows(4, V, 7)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = lp.to(dtype)
        assert retemper_logprobs(x, V, 1.3, 1.3) is x
        assert TopKTeacher(idx, x, temperature=0.7).logprobs_at(0.7, V) is x
        assert TopKTeacher(idx, x).logprobs_at(2.0, V) is x  # None: the loss's temperature
    pair = (idx, lp)
    assert resolve_teacher_topk(pair, V, 2.0) is pair
    i, l = resolve_teacher_topk(TopKTeacher(idx, lp, 2.0), V, 2.0)
    assert i is idx and l is lp
    i, l = resolve_teacher_topk(TopKTeacher(idx, lp, 1.0), V, 2.0)
    torch.testing.assert_close(l, retemper_logprobs(lp, V, 1.0, 2.0))


def test_k_equals_vocab_is_full_tempering():
    g = torch.Generator().manual_seed(1)
    full = torch.log_softmax(torch.randn(3, V, generator=g, dtype=torch.float64) * 3, -1)
    perm = torch.randperm(V, generator=g)
    for t_src, t in [(1.0, 2.0), (1.5, 0.5)]:
        out = retemper_logprobs(full[:, perm], V, t_src, t)
        # The distribution the logprobs came from is softmax(x / t_src) with x = t_src * log p.
        ref = torch.log_softmax(full * t_src / t, -1)[:, perm]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_retemper_is_detached():
    _, lp = _teacher_rows(2, V, 3)
    lp = lp.clone().requires_grad_()
    assert not retemper_logprobs(lp, V, 1.0, 2.0).requires_grad


def test_bad_inputs_name_the_argument():
    idx, lp = _teacher_rows(2, V, 3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            TopKTeacher(idx, lp, temperature=bad)
        with pytest.raises(ValueError, match="source_temperature"):
            retemper_logprobs(lp, V, bad, 1.0)
        with pytest.raises(ValueError, match="^temperature"):
            retemper_logprobs(lp, V, 1.0, bad)
    with pytest.raises(TypeError, match="temperature"):
        TopKTeacher(idx, lp, temperature="1")
    with pytest.raises(TypeError, match="indices"):
        TopKTeacher(idx.float(), lp)
    with pytest.raises(TypeError, match="indices"):
        TopKTeacher(idx.tolist(), lp)
    with pytest.raises(TypeError, match="logprobs"):
        TopKTeacher(idx, idx)
    with pytest.raises(ValueError, match="same shape"):
        TopKTeacher(idx, lp[:, :2])
    with pytest.raises(ValueError, match=r"\[\*, k\]"):
        TopKTeacher(idx[:, :0], lp[:, :0])
    with pytest.raises(ValueError, match=r"\[\*, k\]"):
        TopKTeacher(torch.tensor(1), torch.tensor(-1.0))
    with pytest.raises(ValueError, match="logprobs.*<= 0"):
        TopKTeacher(idx, lp.abs() + 0.1)
    with pytest.raises(ValueError, match="logprobs.*NaN"):
        TopKTeacher(idx, torch.where(lp < -2, math.nan, lp))
    with pytest.raises(ValueError, match="logprobs.*sum to more than 1"):
        TopKTeacher(idx, torch.full_like(lp, math.log(0.5)))
    with pytest.raises(ValueError, match="indices"):
        TopKTeacher(-idx - 1, lp)
    TopKTeacher(-idx - 1, lp, check=False)  # the data checks are optional
    with pytest.raises(ValueError, match="vocab_size"):
        retemper_logprobs(lp, 2, 1.0, 2.0)
    with pytest.raises(TypeError, match="logprobs"):
        retemper_logprobs(idx, V, 1.0, 2.0)
    with pytest.raises(ValueError, match="k must"):
        TopKTeacher.from_logits(torch.randn(2, 5), 6)
    with pytest.raises(TypeError, match="logits"):
        TopKTeacher.from_logits(torch.ones(2, 5, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="index_dtype"):
        TopKTeacher.from_logits(torch.randn(2, 5), 2, index_dtype=torch.int16)


def test_from_logits_matches_topk_of_log_softmax(monkeypatch):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, V, generator=g) * 4
    for t in (1.0, 2.5):
        ref_val, ref_idx = torch.log_softmax(logits / t, -1).topk(8, -1)
        teacher = TopKTeacher.from_logits(logits, 8, t)
        assert teacher.temperature == t and teacher.k == 8 and teacher.shape == (2, 3)
        assert teacher.indices.dtype == torch.int64 and teacher.logprobs.dtype == torch.float32
        assert torch.equal(teacher.indices, ref_idx)
        torch.testing.assert_close(teacher.logprobs, ref_val)
    monkeypatch.setattr(tt, "_CHUNK_ELEMENTS", 2 * V)  # several row chunks
    small = TopKTeacher.from_logits(logits.bfloat16(), 8, 1.0, index_dtype=torch.int32,
                                    logprob_dtype=torch.bfloat16)
    ref_val, ref_idx = torch.log_softmax(logits.bfloat16().float(), -1).topk(8, -1)
    assert small.indices.dtype == torch.int32 and small.logprobs.dtype == torch.bfloat16
    assert torch.equal(small.indices.long(), ref_idx)
    assert torch.equal(small.logprobs, ref_val.bfloat16())
    assert TopKTeacher.from_logits(logits.double(), 3).logprobs.dtype == torch.float64
    assert small.as_tuple() == (small.indices, small.logprobs)
    assert "k=8" in repr(small) and "temperature=1" in repr(small)
    assert "the loss's" in repr(TopKTeacher(small.indices, small.logprobs))
    moved = small.to("cpu")
    assert moved.temperature == 1.0 and moved.indices is small.indices


# --------------------------------------------------------------------------------------------
# Teacher caches


def _sequences(lengths, k=6, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TopKTeacher.from_logits(torch.randn(n, vocab, generator=g) * 3, k, 1.5)
            for n in lengths]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cache_round_trip(tmp_path, dtype):
    lengths = [5, 0, 9, 1]
    seqs = _sequences(lengths)
    path = tmp_path / "c.safetensors"
    tc.save_cache(path, seqs, vocab_size=V, logprob_dtype=dtype, metadata={"model": "tiny"})
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    for mmap in (True, False):
        cache = tc.load_cache(path, mmap=mmap)
        assert len(cache) == 4 and cache.k == 6 and cache.vocab_size == V
        assert cache.temperature == 1.5 and cache.num_tokens == sum(lengths)
        assert cache.offsets.tolist() == [0, 5, 5, 14, 15]
        assert cache.lengths.tolist() == lengths
        assert cache.metadata["model"] == "tiny" and cache.metadata["logprob_dtype"] == dtype
        for got, want in zip(cache, seqs):
            assert got.temperature == 1.5
            assert got.indices.dtype == torch.int32 and got.logprobs.dtype == torch_dtype
            assert torch.equal(got.indices, want.indices.int())
            assert torch.equal(got.logprobs, want.logprobs.to(torch_dtype))
        assert torch.equal(cache[-1].indices, cache[3].indices)
        with pytest.raises(IndexError):
            cache[4]
        assert "sequences=4" in repr(cache)
    # Any safetensors reader reads it (the format is standard).
    st = pytest.importorskip("safetensors")
    with st.safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "fastkd.teacher_cache"
        assert torch.equal(f.get_tensor("offsets"), cache.offsets)
        assert torch.equal(f.get_tensor("logprobs"), cache.logprobs)
        assert torch.equal(f.get_tensor("indices"), cache.indices)


def test_cache_stack_and_tokens(tmp_path):
    seqs = _sequences([4, 4, 3])
    path = tc.save_cache(tmp_path / "c.safetensors", seqs, vocab_size=V)
    cache = tc.load_cache(path)
    batch = cache.stack([1, 0])
    assert batch.shape == (2, 4) and batch.temperature == 1.5
    assert torch.equal(batch.indices[0], cache[1].indices)
    with pytest.raises(ValueError, match="equal lengths"):
        cache.stack([0, 2])
    assert torch.equal(cache.tokens(2, 6).indices, cache.indices[2:6])


def _file_mappings(path):
    """Address ranges of the mappings of ``path`` in this process (Linux)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(real):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_cache_is_memory_mapped(tmp_path):
    seqs = _sequences([300, 200], k=64, vocab=1000)
    path = tc.save_cache(tmp_path / "c.safetensors", seqs, vocab_size=1000)
    cache = tc.load_cache(path)
    maps = _file_mappings(path)
    for t in (cache.indices, cache.logprobs, cache[1].indices, cache[1].logprobs):
        assert any(lo <= t.data_ptr() < hi for lo, hi in maps), "not a view of the file"
    # Copy-on-write: writing to a view never changes the file.
    before = open(path, "rb").read()
    cache[0].logprobs.zero_()
    assert open(path, "rb").read() == before
    eager = tc.load_cache(path, mmap=False)
    assert not any(lo <= eager.indices.data_ptr() < hi for lo, hi in maps)


def test_cache_header_layout(tmp_path):
    path = tc.save_cache(tmp_path / "c.safetensors", _sequences([3]), vocab_size=V)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        size = os.path.getsize(path)
    assert (8 + n) % 8 == 0  # tensors start aligned
    assert header["indices"]["data_offsets"] == [0, 3 * 6 * 4]
    assert header["offsets"]["data_offsets"][1] == size - 8 - n
    assert header["__metadata__"]["num_tokens"] == "3"


def test_cache_writer_errors_and_abort(tmp_path):
    path = tmp_path / "c.safetensors"
    seqs = _sequences([3, 2])
    with pytest.raises(ValueError, match="k = 3"):
        with tc.CacheWriter(path, k=6, vocab_size=V, temperature=1.5) as w:
            w.add(seqs[0])
            w.add(seqs[1].indices[:, :3], seqs[1].logprobs[:, :3])
    assert list(tmp_path.iterdir()) == []  # aborted: no file, no partial files
    with tc.CacheWriter(path, k=6, vocab_size=V, temperature=2.0) as w:
        with pytest.raises(ValueError, match="temperature"):
            w.add(seqs[0])  # the teacher says 1.5
        with pytest.raises(ValueError, match="vocab_size"):
            w.add(seqs[0].indices + V, seqs[0].logprobs)
        with pytest.raises(ValueError, match="logprobs"):
            w.add(seqs[0].indices, -seqs[0].logprobs)
        w.add(seqs[0].indices, seqs[0].logprobs)
    assert len(tc.load_cache(path)) == 1
    with pytest.raises(ValueError, match="logprob_dtype"):
        tc.CacheWriter(tmp_path / "d", k=1, vocab_size=V, temperature=1.0, logprob_dtype="fp32")
    with pytest.raises(ValueError, match="reserved"):
        tc.CacheWriter(tmp_path / "d", k=1, vocab_size=V, temperature=1.0,
                       metadata={"k": "2"})
    with pytest.raises(ValueError, match="temperature"):
        tc.save_cache(tmp_path / "e", [(seqs[0].indices, seqs[0].logprobs)], vocab_size=V)
    # Another safetensors file (written by hand: safetensors is optional).
    other = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "other.safetensors").write_bytes(struct.pack("<Q", len(other)) + other
                                                 + bytes(8))
    with pytest.raises(ValueError, match="not a fastkd teacher cache"):
        tc.load_cache(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------------------------
# The command line, with an injected tiny causal model


class _TinyCausalLM(torch.nn.Module):
    """Logits at position t depend on tokens 0..t (a running mean of embeddings)."""

    def __init__(self, vocab=V, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * 2)

    def forward(self, ids):
        h = self.emb[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
        return h @ self.out.T


def test_read_tokens(tmp_path):
    flat = np.array([5, 1, 9, 0, 7, 0, 0, 3, 4], dtype=np.int32)
    np.save(tmp_path / "t.npy", flat)
    seqs = tc.read_tokens(tmp_path / "t.npy", separator=0)
    assert [s.tolist() for s in seqs] == [[5, 1, 9, 0], [7, 0], [0], [3, 4]]
    seqs = tc.read_tokens(tmp_path / "t.npy", separator=0, max_length=3, max_seqs=3)
    assert [s.tolist() for s in seqs] == [[5, 1, 9], [0], [7, 0]]
    assert [s.tolist() for s in tc.read_tokens(tmp_path / "t.npy")] == [flat.tolist()]
    torch.save(torch.arange(12).reshape(3, 4), tmp_path / "t.pt")
    assert [s.tolist() for s in tc.read_tokens(tmp_path / "t.pt")][2] == [8, 9, 10, 11]
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="integers"):
        tc.read_tokens(tmp_path / "f.npy")
    with pytest.raises(ValueError, match=".npy or .pt"):
        tc.read_tokens(tmp_path / "t.txt")


def test_cli_writes_cache_with_injected_model(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, V, (40,), generator=g)
    tokens[[6, 7, 20, 33]] = 0  # separators: sequences of different lengths in one batch
    torch.save(tokens, tmp_path / "tokens.pt")
    model = _TinyCausalLM()
    loaded = []

    def load_model(name, device, dtype):
        loaded.append((name, device, dtype))
        return model

    out = tmp_path / "cache.safetensors"
    rc = tc.main(["--model", "tiny", "--tokens", str(tmp_path / "tokens.pt"), "--k", "5",
                  "--temperature", "2.0", "--out", str(out), "--batch-size", "3",
                  "--separator", "0", "--dtype", "fp16", "--device", "cpu"],
                 load_model=load_model)
    assert rc == 0 and loaded == [("tiny", "cpu", "auto")]
    assert "bytes/token" in capsys.readouterr().err
    cache = tc.load_cache(out)
    seqs = tc.read_tokens(tmp_path / "tokens.pt", separator=0)
    assert len(cache) == len(seqs) == 5 and cache.lengths.tolist() == [len(s) for s in seqs]
    assert cache.temperature == 2.0 and cache.k == 5 and cache.vocab_size == V
    assert cache.metadata["model"] == "tiny" and cache.logprobs.dtype == torch.float16
    for got, s in zip(cache, seqs):  # each sequence alone: padding changed nothing
        ref = TopKTeacher.from_logits(model(torch.as_tensor(s)[None].long())[0].detach(), 5, 2.0)
        assert torch.equal(got.indices.long(), ref.indices)
        torch.testing.assert_close(got.logprobs.float(), ref.logprobs, rtol=1e-3, atol=1e-3)
    # --max-seqs, no progress bar, the fallback progress lines without tqdm.
    tc.main(["--model", "tiny", "--tokens", str(tmp_path / "tokens.pt"), "--out", str(out),
             "--k", "2", "--max-seqs", "2", "--separator", "0", "--no-progress"],
            load_model=lambda *a: model)
    assert len(tc.load_cache(out)) == 2
    bar = tc._Progress(10, True)
    bar._bar = None  # as without tqdm
    bar.update(10)
    assert "10/10 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tc.main(["--model", "tiny", "--tokens", "x.npy", "--out", "o", "--dtype", "fp32"])


def test_hf_loader_needs_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install transformers"):
            tc.load_hf_model("gpt2")
    else:
        pytest.skip("transformers is installed (and loading a model would need the hub)")


# ------------------------------------------------------------------- wired into the losses
def _loss_inputs(n=24, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return s, t, y


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_kd_loss_retempers_a_topk_teacher(backend):
    """A TopKTeacher at T_src with k = V is the dense teacher at the loss's T, through the loss."""
    import fastkd
    if backend == "cpu" and not fastkd.available_backends()["cpu"]["available"]:
        pytest.skip("cpu extension not built")
    s, t, y = _loss_inputs()
    lp1 = torch.log_softmax(t, -1)
    vals, idx = lp1.sort(-1, descending=True)
    teacher = TopKTeacher(idx, vals, temperature=1.0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    kd = fastkd.KDLoss(temperature=2.5, hard_weight=0.3, backend=backend)
    got = kd(s.to(dtype), None, y, teacher_topk=teacher)
    want = fastkd.KDLoss(temperature=2.5, hard_weight=0.3, backend="reference")(s, t, y)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    hs = torch.randn(s.shape[0], 6, dtype=torch.float64)
    w = torch.randn(s.shape[1], 6, dtype=torch.float64)
    fl = fastkd.FusedLinearKDLoss(temperature=2.5, backend=backend)
    got = fl(hs.to(dtype), w.to(dtype), teacher_topk=teacher)
    want = fastkd.FusedLinearKDLoss(temperature=2.5, backend="reference")(hs, w, teacher_logits=t)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("kind", ["dense", "topk", "fused_linear"])
def test_num_items_in_batch_sums_micro_batches_to_the_whole(kind):
    """SPEC §1e: 4 micro-batches with uneven counted rows, each divided by the step's count, add
    up to one call on the concatenated batch."""
    import fastkd
    s, t, y = _loss_inputs(n=37, v=30, seed=3)
    s, t = s.float(), t.float()
    y[30:] = -100  # the last micro-batch has few counted rows
    s.requires_grad_(True)
    k = 7
    lp, idx = torch.log_softmax(t / 2.0, -1).topk(k)
    hs = torch.randn(37, 5, requires_grad=True)
    w = torch.randn(30, 5)

    def call(rows, num_items=None):
        if kind == "dense":
            return fastkd.KDLoss(temperature=2.0, hard_weight=0.5)(
                s[rows], t[rows], y[rows], num_items_in_batch=num_items)
        if kind == "topk":
            return fastkd.KDLoss(temperature=2.0, hard_weight=0.5)(
                s[rows], None, y[rows], teacher_topk=(idx[rows], lp[rows]),
                num_items_in_batch=num_items)
        return fastkd.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)(
            hs[rows], w, teacher_logits=t[rows], target=y[rows], num_items_in_batch=num_items)

    whole = call(slice(0, 37))
    grads_whole = torch.autograd.grad(whole, [s if kind != "fused_linear" else hs])[0]
    n_items = torch.tensor(int((y != -100).sum()))
    parts = sum(call(slice(a, b), n_items) for a, b in [(0, 5), (5, 19), (19, 30), (30, 37)])
    grads_parts = torch.autograd.grad(parts, [s if kind != "fused_linear" else hs])[0]
    assert abs(parts.item() - whole.item()) <= 1e-6 * abs(whole.item())
    assert torch.allclose(grads_parts, grads_whole, rtol=1e-5, atol=1e-7)
    # Divided by this call's count instead, the parts do not add up (the check can fail).
    naive = sum(call(slice(a, b)) for a, b in [(0, 5), (5, 19), (19, 30), (30, 37)])
    assert abs(naive.item() - whole.item()) > 1e-3 * abs(whole.item())


def test_num_items_in_batch_errors():
    import fastkd
    s, t, y = _loss_inputs(n=4, v=5)
    with pytest.raises(ValueError, match="num_items_in_batch.*reduction='mean'"):
        fastkd.KDLoss(reduction="sum")(s, t, y, num_items_in_batch=3)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fastkd.KDLoss()(s, t, y, num_items_in_batch=torch.ones(2))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fastkd.KDLoss()(s, t, y, num_items_in_batch=float("nan"))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fastkd.KDLoss()(s, t, y, num_items_in_batch=-1)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_topk_all_rows_ignored_is_zero(backend):
    """Every row ignored: loss 0 with a zero gradient (no NaN from 0 / 0), on every backend,
    through KDLoss and FusedLinearKDLoss, with a TopKTeacher taken at another temperature."""
    import fastkd
    if not fastkd.available_backends()[backend]["available"]:
        pytest.skip(f"{backend} is not available here")
    s, t, _ = _loss_inputs(n=6, v=30)
    dtype = torch.float64 if backend == "reference" else torch.float32
    s = s.to(dtype).requires_grad_(True)
    lp, idx = torch.log_softmax(t, -1).topk(5)
    teacher = TopKTeacher(idx, lp.to(torch.bfloat16), temperature=1.0)
    y = torch.full((6,), -100)
    loss = fastkd.KDLoss(temperature=3.0, hard_weight=1.0, backend=backend)(
        s, None, y, teacher_topk=teacher)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0
    hs = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(30, 4, dtype=dtype)
    loss = fastkd.FusedLinearKDLoss(temperature=3.0, hard_weight=1.0, backend=backend)(
        hs, w, target=y, teacher_topk=teacher)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hs.grad) == 0
