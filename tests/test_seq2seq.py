"""fastgpt.models.Seq2SeqTransformer: the forward pass against torch.nn.Transformer, cached decoding against
uncached, beam search of width 1 against greedy, a copy task that learns, torch.compile, autocast, input checks."""

import copy
import math

import pytest
import torch

import fastgpt
from fastgpt.models import Seq2SeqConfig, Seq2SeqTransformer
from fastgpt.models.seq2seq import sinusoids
from tests.utils import DEVICE_BACKENDS, assert_close

PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides):
    config = dict(src_vocab_size=13, tgt_vocab_size=13, d_model=32, nhead=4, num_encoder_layers=2,
                  num_decoder_layers=2, dim_feedforward=64, dropout=0.0, max_len=40)
    config.update(overrides)
    return Seq2SeqConfig(**config)


def _batch(batch=3, length=7, vocab=13):
    """Right-padded source rows of different lengths, ids from 3 (after PAD, BOS, EOS)."""
    src = torch.randint(3, vocab, (batch, length))
    src[1, length - 2:] = PAD
    src[2, length // 2:] = PAD
    return src


def test_base_preset():
    c = Seq2SeqConfig.base(100, 120)
    assert (c.num_encoder_layers, c.num_decoder_layers, c.d_model, c.nhead, c.dim_feedforward, c.dropout) == \
        (6, 6, 512, 8, 2048, 0.1)
    assert c.label_smoothing == 0.1 and Seq2SeqConfig.base(100, 120, dropout=0.3).dropout == 0.3


def test_sinusoids():
    table = sinusoids(50, 16)
    pos, i = 37, 3
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_forward_matches_torch_transformer(device, backend, norm_first):
    """The model's encoder-decoder is fastgpt.nn.Transformer: the same state in torch.nn.Transformer (float64)
    gives the same logits and gradients."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config(norm_first=norm_first, share_embeddings=True)).to(device)
    assert model.src_embed is model.tgt_embed
    c = model.config
    reference = torch.nn.Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                     c.dim_feedforward, 0.0, batch_first=True, norm_first=norm_first)
    reference.load_state_dict(model.transformer.state_dict())
    src, tgt = _batch().to(device), _batch(length=6).to(device)
    labels = torch.roll(tgt, -1, dims=1)

    def torch_run(dtype):
        """(logits, loss, embedding gradient) of torch.nn.Transformer with the model's weights, in dtype."""
        transformer = reference.to(device=device, dtype=dtype)
        weight = model.src_embed.weight.detach().to(dtype).requires_grad_()
        scale, pos = math.sqrt(c.d_model), model.positions.to(dtype)
        embed = lambda ids: torch.nn.functional.embedding(ids, weight, padding_idx=PAD)  # noqa: E731
        hidden = transformer(embed(src) * scale + pos[:src.shape[1]], embed(tgt) * scale + pos[:tgt.shape[1]],
                             tgt_mask=transformer.generate_square_subsequent_mask(tgt.shape[1], device=device,
                                                                                  dtype=dtype),
                             src_key_padding_mask=src == PAD, memory_key_padding_mask=src == PAD)
        logits = hidden @ weight.t()
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 13), labels.reshape(-1),
                                                 ignore_index=PAD)
        loss.backward()
        return logits.detach(), loss.detach().to(dtype), weight.grad

    expected, theirs = torch_run(torch.float64), torch_run(torch.float32)
    with fastgpt.use_backend(backend):
        out = model(src, tgt, labels)
    out.loss.backward()
    got = (out.logits.detach(), out.loss.detach(), model.src_embed.weight.grad)
    for name, g, e, t in zip(("logits", "loss", "dembedding"), got, expected, theirs):
        assert_close(name, g, e, t)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_cached_greedy_equals_uncached(device, backend, norm_first):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config(norm_first=norm_first, activation="gelu")).to(device).eval()
    src = _batch().to(device)
    steps = 12 if backend == "reference" or device == "cuda" else 4  # the Triton interpreter is slow per launch
    with fastgpt.use_backend(backend):
        cached = model.greedy_decode(src, max_len=steps)
        uncached = model.greedy_decode(src, max_len=steps, use_cache=False)
        assert torch.equal(cached, uncached)
        # and every step's logits agree with the full decoder on the prefix
        memory, padding = model.encode(src)
        prefix = torch.cat([torch.full((3, 1), BOS, device=device), cached], dim=1)
        full = model.decode(prefix[:, :-1], memory, padding)
        cache = model._start_cache(memory, padding, prefix.shape[1])
        steps = torch.stack([model._decode_step(prefix[:, t:t + 1], cache) for t in range(prefix.shape[1] - 1)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_beam_of_one_is_greedy():
    torch.manual_seed(1)
    model = Seq2SeqTransformer(_config()).eval()
    src = _batch(batch=4)
    assert torch.equal(model.beam_search(src, beam_size=1, max_len=10), model.greedy_decode(src, max_len=10))


def test_beam_search_finds_at_least_greedys_score():
    """A wider beam never ends with a lower length-normalised log-probability than greedy's hypothesis."""
    torch.manual_seed(2)
    model = Seq2SeqTransformer(_config()).eval()
    src = _batch(batch=4)

    def score(hyp, alpha=0.6):
        tgt = torch.cat([torch.full((4, 1), BOS), hyp], dim=1)
        log_probs = model(src, tgt[:, :-1]).logits.log_softmax(-1).gather(-1, hyp[..., None])[..., 0]
        real = (hyp != PAD).float()
        return (log_probs * real).sum(1) / ((5 + real.sum(1)) / 6) ** alpha

    with torch.no_grad():
        greedy, beam = model.greedy_decode(src, max_len=8), model.beam_search(src, beam_size=4, max_len=8)
        assert torch.all(score(beam) >= score(greedy) - 1e-5)


def test_decoding_never_emits_pad_or_bos(monkeypatch):
    """However likely the model finds padding and BOS, a decoded row is real tokens, then EOS, then padding."""
    torch.manual_seed(3)
    model = Seq2SeqTransformer(_config()).eval()
    src = _batch(batch=4)
    decode_step = model._decode_step

    def favouring_specials(tokens, cache):
        step = cache.length
        logits = decode_step(tokens, cache).clone()  # (rows, V), rows sentence-major
        logits[:, [PAD, BOS]] += 100.0
        logits[:, EOS] -= 100.0
        if step == 4:  # the first half of the sentences end here, the others run to max_len
            logits[:logits.shape[0] // 2, EOS] += 300.0
        return logits

    monkeypatch.setattr(model, "_decode_step", favouring_specials)
    for out in (model.greedy_decode(src, max_len=9), model.beam_search(src, beam_size=3, max_len=9)):
        assert not (out == BOS).any()
        ended = (out == EOS).cumsum(1) > 0
        shifted = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], 1)  # after the row's EOS
        assert torch.equal(out == PAD, shifted), out
        assert ended.any() and not ended[:, -1].all()


def test_copy_task_learns():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config(d_model=32, dim_feedforward=64, num_encoder_layers=1,
                                       num_decoder_layers=1, share_embeddings=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    losses = []
    for _ in range(150):
        src = torch.randint(3, 13, (16, 6))
        tgt_in = torch.cat([torch.full((16, 1), BOS), src], dim=1)
        labels = torch.cat([src, torch.full((16, 1), EOS)], dim=1)
        loss = model(src, tgt_in, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.25 * first, (first, last)
    model.eval()
    src = torch.randint(3, 13, (16, 6))
    copied = model.greedy_decode(src, max_len=7)
    assert (copied[:, :6] == src).float().mean() > 0.5


def test_dropout_in_training_only():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config(dropout=0.3, activation="gelu"))
    src, tgt = _batch(), _batch(length=5)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(src, tgt).logits, model(src, tgt).logits)
        model.train()
        pytest.importorskip("fastgpt.ops.philox", reason="attention dropout needs fastgpt.ops.philox (attn-triton)")
        assert not torch.equal(model(src, tgt).logits, model(src, tgt).logits)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config())
    src, tgt = _batch(), _batch(length=5)
    labels = torch.roll(tgt, -1, dims=1)
    eager = model(src, tgt, labels)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(src, tgt, labels)  # inductor
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.loss, eager.loss)


def test_bf16_autocast():
    """Under bf16 autocast the logits' error against float64 is at most twice that of the same model run on
    torch.nn's modules (the fastgpt twins turned back into their torch.nn classes) under autocast."""
    from fastgpt.nn.convert import TWINS
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config()).eval()
    peer = copy.deepcopy(model)
    back = {fast: theirs for theirs, fast in TWINS.items()}
    for module in peer.modules():
        module.__class__ = back.get(type(module), type(module))
    assert type(peer.transformer.decoder.layers[0].self_attn) is torch.nn.MultiheadAttention
    src = _batch()
    # Gradients stay enabled: torch.nn's no-grad fast path ignores CPU autocast and fails on its bf16 tensors.
    expected = copy.deepcopy(model).double()(src, src).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, src).logits.detach()
        theirs = peer(src, src).logits.detach()
        tokens = model.beam_search(src, beam_size=2, max_len=6)
    assert logits.dtype == theirs.dtype == torch.bfloat16 and tokens.shape[0] == 3
    assert_close("bf16 logits", logits, expected, theirs)


def test_bad_input():
    model = Seq2SeqTransformer(_config())
    src = _batch()
    with pytest.raises(ValueError, match=r"src holds token ids outside the vocabulary \[0, 13\)"):
        model(src + 10, src)
    with pytest.raises(TypeError, match=r"src to be an int64 or int32 tensor, got torch\.uint8"):  # nn.Embedding's
        model.greedy_decode(src.to(torch.uint8))
    with pytest.raises(ValueError, match="beyond max_len = 40"):
        model(torch.full((1, 41), 3), src[:1])
    with pytest.raises(ValueError, match=r"expected src_padding of shape \(3, 7\)"):
        memory, padding = model.encode(src)
        model.decode(src, memory, padding[:, :-1])
    with pytest.raises(ValueError, match="labels of shape"):
        model(src, src, src[:, :-1])
    for penalty in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"beam_search: expected length_penalty in \[0, inf\)"):
            model.beam_search(src, length_penalty=penalty)
    with pytest.raises(ValueError, match="share_embeddings needs one vocabulary"):
        _config(share_embeddings=True, tgt_vocab_size=14)
    state = model.state_dict()
    state["transformer.encoder.layers.0.linear1.weight"] = state["transformer.encoder.layers.0.linear1.weight"][:3]
    with pytest.raises(RuntimeError, match="size mismatch for transformer.encoder.layers.0.linear1.weight"):
        model.load_state_dict(state)


def test_empty_batch():
    # The id range check took aminmax of no ids (RuntimeError: 'cannot compute aminmax over an empty dimension'),
    # and the decoders' head split a view with -1 over 0 elements.
    model = Seq2SeqTransformer(_config()).eval()
    src, tgt = torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)
    assert model(src, tgt, tgt).logits.shape == (0, 3, 13)
    assert model.greedy_decode(src, max_len=4).shape[0] == 0
    assert model.beam_search(src, beam_size=2, max_len=4).shape[0] == 0


def test_non_integer_beam_size_and_max_len():
    # Were taken up to repeat_interleave / range(), which failed with TypeErrors naming neither argument.
    model = Seq2SeqTransformer(_config()).eval()
    src = _batch()
    for beam_size in (2.5, 2.0, True):
        with pytest.raises(ValueError, match="beam_search: expected beam_size to be an int >= 1"):
            model.beam_search(src, beam_size=beam_size, max_len=3)
    for max_len in (3.0, 3.5):
        with pytest.raises(ValueError, match=r"expected max_len to be an int in \[1, 40\]"):
            model.greedy_decode(src, max_len=max_len)
        with pytest.raises(ValueError, match=r"expected max_len to be an int in \[1, 40\]"):
            model.beam_search(src, max_len=max_len)


def test_float64_beam_search_tells_near_ties_apart():
    # Beam search scored in float32 whatever the model's dtype: token 4's logit 1e-9 above token 3's rounded to the
    # same float32 value, and a beam of 2 returned 3 4 3 where a float64 model's best (and greedy) is 4 4 4.
    torch.manual_seed(0)
    model = Seq2SeqTransformer(_config(tie_output=False)).double().eval()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[3], model.output.bias[4] = 1.0, 1.0 + 1e-9
    src = _batch()
    expected = torch.full((3, 3), 4)
    assert torch.equal(model.greedy_decode(src, max_len=3), expected)
    for beam_size in (1, 2, 3):
        assert torch.equal(model.beam_search(src, beam_size=beam_size, max_len=3), expected)


def test_a_row_decodes_the_same_alone_as_in_a_padded_batch():
    """The default limit on generated tokens is each row's own source length + 50: taken from the padded batch's
    width, a row that never emits EOS was cut at another length in a batch (58 tokens) than alone (52)."""
    torch.manual_seed(0)
    config = _config(max_len=80, tie_output=False)
    model = Seq2SeqTransformer(config).eval()
    with torch.no_grad():  # EOS never wins: every row runs to its limit
        model.output.bias[config.eos_id] = -1e4
    short, long = torch.tensor([[5, 6]]), torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    batch = torch.full((2, 8), config.pad_id)
    batch[0, :2], batch[1] = short[0], long[0]
    for decode in (model.greedy_decode, lambda src: model.beam_search(src, beam_size=2)):
        alone, together = [decode(row) for row in (short, long)], decode(batch)
        assert [a.shape[1] for a in alone] == [52, 58]
        for row, tokens in enumerate(alone):
            assert torch.equal(together[row, :tokens.shape[1]], tokens[0])
            assert (together[row, tokens.shape[1]:] == config.pad_id).all()
    limits = torch.tensor([3, 5])
    assert (model.greedy_decode(batch, max_len=limits) != config.pad_id).sum(1).tolist() == [3, 5]
    with pytest.raises(ValueError, match=r"max_len's limits in \[1, 80\]"):
        model.greedy_decode(batch, max_len=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\)"):
        model.greedy_decode(batch, max_len=torch.tensor([3]))
