"""fastgpt.models.GPT1 against Hugging Face's OpenAIGPTLMHeadModel (small random models, no download), its KV cache,
sampling, classification head, torch.compile, bf16 autocast and input checks."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.models import GPT1, GPT1Config, KVCache
from fastgpt.models.gpt1 import _CONV1D, from_hf, to_hf
from tests.utils import DEVICE_BACKENDS, assert_close

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT = 61, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(dropout=0.0, **overrides):
    config = dict(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, resid_pdrop=dropout,
                  embd_pdrop=dropout, attn_pdrop=dropout)
    config.update(overrides)
    return transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**config))


def _small(**overrides):
    config = dict(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, n_inner=128,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config.update(overrides)
    return GPT1(GPT1Config(**config))


def _hf_name(name):
    """Our parameter name -> Hugging Face's, and whether the tensor is stored transposed there."""
    return f"transformer.{name}", name.endswith(_CONV1D)


def _run_hf(model, ids, float64_loss=False):
    """Hugging Face's logits, loss and gradients; its loss is float32 whatever the model's dtype, so the float64
    reference takes the same shifted cross-entropy in float64 instead."""
    model.zero_grad(set_to_none=True)
    if float64_loss:
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        out = model(ids, labels=ids)
        logits, loss = out.logits, out.loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _run_ours(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------

def test_config_defaults_are_gpt1():
    c = GPT1Config()
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions, c.vocab_size) == (12, 768, 12, 3072, 512, 40478)
    assert c.gelu_approximate == "tanh" and c.tie_word_embeddings
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop, c.layer_norm_epsilon, c.initializer_range) == \
        (0.1, 0.1, 0.1, 1e-5, 0.02)


def test_num_parameters_gpt1():
    with torch.device("meta"):
        model = GPT1()
    assert model.num_parameters() == 116_534_784  # 116.5M, the tied embedding once
    assert model.num_parameters(exclude_position_embeddings=True) == 116_534_784 - 512 * 768
    assert not hasattr(model, "lm_head")  # tied: the logits reuse tokens_embed.weight


def test_initialisation():
    torch.manual_seed(0)
    model = GPT1(GPT1Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64))
    std = model.h[0].mlp.c_fc.weight.std().item()
    assert abs(std - 0.02) < 0.002, std
    assert torch.all(model.h[1].attn.c_attn.bias == 0) and torch.all(model.h[0].ln_1.weight == 1)
    assert type(model.h[0].ln_1) is fastgpt.nn.LayerNorm


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout0"])
def test_matches_hugging_face_both_ways(device, backend, dtype, train):
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("the kernels take float32 and narrower: float64 runs on reference, checked there")
    torch.manual_seed(0)
    reference = _hf().to(device=device, dtype=torch.float64).train(train)
    peer = _hf().to(device=device, dtype=dtype).train(train)
    peer.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (3, 11), device=device)

    expected = _run_hf(reference, ids, float64_loss=True)
    theirs = _run_hf(peer, ids)
    ours_model = from_hf(peer)
    assert ours_model.training == train and ours_model.tokens_embed.weight.dtype == dtype
    with fastgpt.use_backend(backend):
        ours = _run_ours(ours_model, ids)
    assert_close("logits", ours[0], expected[0], theirs[0])
    assert_close("loss", ours[1], expected[1], theirs[1].to(dtype))  # ours is float64 for a float64 model
    assert len(ours[2]) == len(expected[2])  # named_parameters lists the tied weight once on both sides
    for name, grad in ours[2].items():
        hf_name, transposed = _hf_name(name)
        e, t = expected[2][hf_name], theirs[2][hf_name]
        assert_close(f"d{name}", grad, e.t() if transposed else e, t.t() if transposed else t)

    back = to_hf(ours_model)  # and back again: the same weights, so the same numbers as `peer`
    assert back.training == train
    again = _run_hf(back, ids)
    torch.testing.assert_close(again[0], theirs[0], rtol=0, atol=0)
    for name, param in back.state_dict().items():
        torch.testing.assert_close(param, peer.state_dict()[name], rtol=0, atol=0)


def test_untied_head_both_ways():
    """A Hugging Face model with its own output head (tie_word_embeddings=False) keeps it through from_hf and to_hf."""
    torch.manual_seed(0)
    hf = _hf(tie_word_embeddings=False).eval()
    assert not torch.equal(hf.lm_head.weight, hf.transformer.tokens_embed.weight)
    ids = torch.randint(0, VOCAB, (2, 9))
    ours = from_hf(hf)
    assert not ours.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    back = to_hf(ours)
    for name, param in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], param, rtol=0, atol=0)
    headless = transformers.OpenAIGPTModel(hf.config)
    with pytest.raises(ValueError, match="unties the output head .* OpenAIGPTLMHeadModel"):
        from_hf(headless)


def test_float64_loss_and_empty_batch():
    """A float64 model's loss is computed in float64 (gradcheck-grade); a batch of no rows gives no logits."""
    torch.manual_seed(0)
    model = _small(num_labels=2).double()
    ids = torch.randint(0, VOCAB, (2, 7))
    assert model(ids, labels=ids).loss.dtype == torch.float64
    assert model.classify(ids, labels=torch.tensor([0, 1])).loss.dtype == torch.float64
    assert model(torch.zeros(0, 5, dtype=torch.long)).logits.shape == (0, 5, VOCAB)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_kv_cache_equals_full_forward(device, backend):
    torch.manual_seed(0)
    model = _small().to(device).eval()
    ids = torch.randint(0, VOCAB, (2, 13), device=device)
    with fastgpt.use_backend(backend), torch.no_grad():
        full = model(ids).logits
        cache = KVCache(capacity=ids.shape[1])
        pieces = [model(ids[:, :4], cache=cache).logits]  # prefill
        for t in range(4, 8):  # one token at a time
            pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
        pieces.append(model(ids[:, 8:11], cache=cache).logits)  # a chunk after a prefix: bottom-right causal mask
        pieces.append(model(ids[:, 11:], cache=cache).logits)
        assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_cached_equals_uncached_and_full_forward():
    torch.manual_seed(0)
    model = _small().eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = model.generate(prompt, 10, temperature=0)
    uncached = model.generate(prompt, 10, temperature=0, use_cache=False)
    assert cached.shape == (2, 15) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    logits = model(cached).logits
    assert torch.equal(cached[:, 5:], logits[:, 4:-1].argmax(-1))  # each token is the argmax given its prefix
    # top_k=1 and a tiny top_p leave only the likeliest token: sampling becomes greedy
    assert torch.equal(model.generate(prompt, 10, top_k=1), cached)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-6), cached)


def test_generate_slides_past_the_context_and_stops_at_eos():
    torch.manual_seed(0)
    model = _small().eval()
    prompt = torch.randint(0, VOCAB, (2, CONTEXT - 3))
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, CONTEXT + 5)
    assert torch.equal(out, model.generate(prompt, 8, temperature=0, use_cache=False))
    # the last token, generated with the context full, is the argmax given the CONTEXT tokens before it
    last = model(out[:, -1 - CONTEXT:-1]).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, -1], last)
    eos = int(out[0, CONTEXT - 3])  # the first generated token of row 0
    stopped = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    assert stopped[0, CONTEXT - 3] == eos and torch.all(stopped[0, CONTEXT - 3:] == eos)


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    model = _small().eval()
    prompt = torch.randint(0, VOCAB, (4, 3))
    a = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    logits = model(a).logits[:, 2:-1]  # the logits each sampled token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert torch.all((top3 == a[:, 3:, None]).any(-1))


def test_tiny_temperature_is_greedy():
    """A temperature so small that logits / temperature overflows still samples the likeliest token."""
    torch.manual_seed(0)
    model = _small().eval()
    prompt = torch.randint(0, VOCAB, (3, 4))
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(model.generate(prompt, 5, temperature=1e-40, generator=torch.Generator().manual_seed(0)),
                       greedy)


def test_classification_head():
    torch.manual_seed(0)
    model = _small(num_labels=3, extract_token_id=VOCAB - 1, clf_pdrop=0.0)
    ids = torch.randint(0, VOCAB - 1, (2, 9))
    ids[0, 6], ids[1, 8] = VOCAB - 1, VOCAB - 1
    labels = torch.tensor([0, 2])
    out = model.classify(ids, labels=labels, lm_labels=ids)
    assert out.logits.shape == (2, 3)
    hidden = model.hidden_states(ids)
    expected = model.classifier(torch.stack([hidden[0, 6], hidden[1, 8]]))
    torch.testing.assert_close(out.logits, expected)
    lm = model(ids, labels=ids).loss
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, labels) + 0.5 * lm)
    out.loss.backward()
    assert model.classifier.weight.grad is not None and model.tokens_embed.weight.grad is not None
    explicit = model.classify(ids, extract_index=torch.tensor([6, 8]))
    torch.testing.assert_close(explicit.logits, out.logits)
    for index in ([6, -1], [9, 8]):  # -1 would have pooled the last position, 9 failed inside the gather
        with pytest.raises(ValueError, match=r"extract_index in \[0, 9\) \(positions of input_ids\)"):
            model.classify(ids, extract_index=torch.tensor(index))
    with pytest.raises(ValueError, match="has no extract token"):
        model.classify(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_labels .* needs labels"):
        model.classify(ids, lm_labels=ids)
    with pytest.raises(ValueError, match=r"expected lm_labels of shape \(2, 9\)"):
        model.classify(ids, labels=labels, lm_labels=ids[:, :-1])
    with pytest.raises(ValueError, match="has no classifier"):
        _small().classify(ids)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _small()
    ids = torch.randint(0, VOCAB, (2, 10))
    eager = model(ids, labels=ids)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor: the generated code, not only the trace
    out = compiled(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_bf16_autocast_error_within_twice_pytorchs():
    torch.manual_seed(0)
    hf = _hf().eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    ours = from_hf(hf)
    expected = _hf().double().eval()
    expected.load_state_dict(hf.state_dict())
    with torch.no_grad():
        reference = expected(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = hf(ids).logits
            logits = ours(ids).logits
    assert logits.dtype == theirs.dtype == torch.bfloat16
    assert_close("bf16 logits", logits, reference, theirs)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute

def test_bad_token_ids():
    model = _small()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 61\): min 0, max 61"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 3]]))
    for ids in (torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]], dtype=torch.uint8)):  # nn.Embedding's rule
        with pytest.raises(TypeError, match=r"int64 or int32 tensor, got torch\.(float32|uint8)"):
            model(ids)
    torch.testing.assert_close(model(torch.tensor([[0, 1]], dtype=torch.int32)).logits,
                               model(torch.tensor([[0, 1]])).logits)
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="longer than the context, n_positions = 24"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))
    cache = KVCache(CONTEXT)
    model(torch.zeros(1, CONTEXT - 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"23 cached \+ 2 new"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds a batch of 1 rows, got input_ids with 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    small = KVCache(4)
    with pytest.raises(ValueError, match=r"0 cached \+ 6 new positions exceed its capacity 4"):
        model(torch.zeros(1, 6, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match=r"labels of shape \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))


def test_bad_generate_arguments(monkeypatch):
    model = _small().eval()
    prompt = torch.tensor([[3, 5]])
    with pytest.raises(ValueError, match=r"input_ids holds token ids outside the vocabulary \[0, 61\)"):
        model.generate(torch.tensor([[3, 61]]), 2)
    with pytest.raises(ValueError, match=r"eos_token_id to be an int in \[0, 61\)"):
        model.generate(prompt, 2, eos_token_id=61)
    with pytest.raises(ValueError, match="max_new_tokens >= 0"):
        model.generate(prompt, -1)
    for top_p in (0.0, "0.9"):
        with pytest.raises(ValueError, match=r"top_p in \(0, 1\]"):
            model.generate(prompt, 2, top_p=top_p)
    with pytest.raises(ValueError, match=r"eos_token_id to be an int"):
        model.generate(prompt, 2, eos_token_id=2.0)
    with pytest.raises(ValueError, match="unsqueeze"):
        model.generate(prompt[0], 2)
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature to be a finite number >= 0"):
            model.generate(prompt, 2, temperature=temperature)
    with pytest.raises(ValueError, match="top_k to be an int >= 1, got 2.5"):
        model.generate(prompt, 2, top_k=2.5)
    # The prompt's range check is the only one: the steps feed back the model's own picks without a device sync.
    calls = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t.shape) or aminmax(t))
    model.generate(prompt, 5, temperature=0)
    assert calls == [prompt.shape]


def test_bad_checkpoint():
    model = _small()
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \(1\): h.1.ln_2.bias"):
        model.load_state_dict({k: v for k, v in state.items() if k != "h.1.ln_2.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): lm_head.weight"):
        model.load_state_dict({**state, "lm_head.weight": state["tokens_embed.weight"]})
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): tokens_embed.weight: checkpoint \(60, 32\), "
                                         r"model \(61, 32\)"):
        model.load_state_dict({**state, "tokens_embed.weight": state["tokens_embed.weight"][:-1]})
    bigger = _small(n_layer=3).state_dict()
    with pytest.raises(ValueError, match=r"n_layer=2.*unexpected keys \(12\): h.2"):
        model.load_state_dict(bigger)
    with pytest.raises(ValueError, match="from_hf"):
        model.load_state_dict(_hf().state_dict())
    with pytest.raises(ValueError, match="afn='gelu'"):
        from_hf(_hf(afn="relu"))


def test_bad_config():
    with pytest.raises(ValueError, match="n_embd \\(30\\) must be a multiple of n_head \\(4\\)"):
        GPT1Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="resid_pdrop in \\[0, 1\\)"):
        GPT1Config(resid_pdrop=1.0)
    with pytest.raises(ValueError, match="gelu_approximate"):
        GPT1Config(gelu_approximate="exact")


def test_float64_sampling_tells_near_ties_apart():
    # _sample rounded the logits to float32 whatever the model's dtype: token 9's logit 1e-10 above token 7's rounded
    # to the same value, and greedy generation of a float64 model picked 7, not the argmax of its logits.
    model = _small(tie_word_embeddings=False).double().eval()
    with torch.no_grad():
        last = model.h[-1].ln_2
        last.weight.zero_()
        last.bias.fill_(1.0)  # every hidden state is all ones: the logits are the head's row sums
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 0.1
        model.lm_head.weight[9] = 0.1 * (1 + 1e-10)
    ids = torch.randint(0, VOCAB, (2, 3))
    assert model(ids).logits[:, -1].argmax(-1).tolist() == [9, 9]
    assert model.generate(ids, 2, temperature=0)[:, 3:].tolist() == [[9, 9], [9, 9]]
    assert model.generate(ids, 2, temperature=1e-12)[:, 3:].tolist() == [[9, 9], [9, 9]]
