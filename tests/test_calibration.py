"""Calibration: token windows (self-generated or from a file) and block-by-block input Grams, experts included."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from salr.calibration import (
    BlockwiseCalibration,
    NucleusFilter,
    NucleusSampler,
    calibration_ids,
    decoder_blocks,
    file_ids,
    output_errors,
    relative_output_error,
    self_generated_ids,
)
from salr.errors import SALRError

ROOT = Path(__file__).resolve().parents[1]

GSM8K_LINE = '{"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\\n#### 7"}\n'


def test_self_generated_ids_are_seeded_full_length_and_leave_the_rng_alone(tiny_llama):
    tiny_llama.config.bos_token_id = 1
    state = torch.random.get_rng_state()
    a = self_generated_ids(tiny_llama, samples=5, length=12, seed=3, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    c = self_generated_ids(tiny_llama, samples=5, length=12, seed=4)
    assert a.shape == (5, 12) and (a[:, 0] == 1).all()
    assert not torch.equal(a, c)
    assert torch.equal(a, self_generated_ids(tiny_llama, samples=5, length=12, seed=3, batch_size=2))


@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0, 1000.0])
def test_nucleus_filter_keeps_the_same_tokens_as_transformers_top_p(temperature):
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5003, generator=generator) * (3.0 / temperature)
    scores[1, 7] = 40.0  # one token holds nearly all the mass
    scores[2, :4000] = -torch.inf  # suppressed tokens (min_new_tokens masks EOS the same way)
    scores[3] = 0.0  # flat: the partial top-k must grow to the whole vocabulary
    assert torch.equal(NucleusFilter(1.0)(None, scores.clone()), scores)  # transformers skips its warper at 1.0
    for top_p in (0.3, 0.5, 0.95, 0.999):
        ours = NucleusFilter(top_p, first_k=16)(None, scores.clone())
        theirs = TopPLogitsWarper(top_p)(None, scores.clone())
        kept_ours, kept_theirs = ours > -torch.inf, theirs > -torch.inf
        # a near-tie at the nucleus edge may fall either way in float32 sums taken in different orders
        distinct = [0, 1, 2, 4, 5]
        assert (kept_ours[distinct] != kept_theirs[distinct]).sum() <= 1, top_p
        # equal logits: which of them are kept depends on each sort's tie order, how many does not
        assert abs(int(kept_ours[3].sum()) - int(kept_theirs[3].sum())) <= 1, top_p
        assert torch.equal(ours[kept_ours], scores[kept_ours])
        assert kept_ours.sum(dim=-1).min() >= 1
    assert (NucleusFilter(0.95)(None, scores) > -torch.inf)[1].sum() == 1
    with pytest.raises(SALRError, match="top_p"):
        NucleusFilter(0.0)


def test_nucleus_sampler_draws_from_the_filtered_distribution():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=generator) * 2.0
    scores[1] = 0.0  # flat: the nucleus is wider than first_k, so the sampler must widen as the filter does
    scores[2, 5] = 30.0  # one token holds nearly all the mass
    sampler = NucleusSampler(0.8, first_k=4)
    allowed = NucleusFilter(0.8, first_k=4)(None, scores.clone()) > -torch.inf
    expected = scores.masked_fill(~allowed, -torch.inf).softmax(dim=-1)
    torch.manual_seed(0)
    draws = 20_000
    out = sampler(None, scores.repeat(draws, 1))  # row i + 3 j is a draw from row i
    assert ((out == 0).sum(dim=-1) == 1).all() and ((out == 0) | (out == -torch.inf)).all()
    counts = (out == 0).reshape(draws, *scores.shape).sum(dim=0).float()
    assert not (counts.bool() & ~allowed).any()  # never outside the nucleus
    assert (counts / draws - expected).abs().max() < 0.015  # 3 sigma of a frequency near 0.1 over 20,000 draws
    assert (counts[2, 5] == draws).item()


def test_file_ids_windows_from_text_and_gsm8k(tmp_path, make_tokenizer):
    tok = make_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ids = file_ids(tok, text, samples=3, length=16, seed=0)
    assert ids.shape == (3, 16) and (ids[:, 0] == tok.bos_token_id).all()
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(GSM8K_LINE * 20)
    assert file_ids(tok, gsm, samples=2, length=16).shape == (2, 16)
    for name in ("wiki.test.tokens", "corpus"):  # any name but .json / .jsonl is plain text (they were parsed as JSON)
        (tmp_path / name).write_text(text.read_text())
        assert torch.equal(file_ids(tok, tmp_path / name, samples=3, length=16, seed=0), ids)
    short = tmp_path / "s.txt"
    short.write_text("too short")
    with pytest.raises(SALRError, match="fewer than one calibration window"):
        file_ids(tok, short, samples=2, length=64)


def test_calibration_ids_checks_its_arguments(tiny_llama, tmp_path):
    with pytest.raises(SALRError, match="no such file"):
        calibration_ids(tiny_llama, None, str(tmp_path / "missing.txt"), 2, 8)
    tiny_llama.config.bos_token_id = 1
    assert calibration_ids(tiny_llama, None, "self", 2, 10_000).shape == (2, 64)  # cut to the model's context


def test_block_grams_equal_the_inputs_each_linear_receives(tiny_llama):
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {}
    _, blocks = decoder_blocks(tiny_llama)
    handles = [
        blocks[1].get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0]))
        for n in ("self_attn.q_proj", "mlp.down_proj")
    ]
    with torch.no_grad():
        tiny_llama(ids)
    for h in handles:
        h.remove()
    calib = BlockwiseCalibration(tiny_llama, ids, batch_size=3)
    calib.capture_inputs()
    calib.hidden = calib.run_block(blocks[0])  # dense propagation to block 1
    stats, outputs = calib.statistics(blocks[1], ["self_attn.q_proj", "mlp.down_proj"])
    assert all(torch.equal(a, b) for a, b in zip(outputs, calib.run_block(blocks[1]), strict=True))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        x = torch.cat(seen[name]).reshape(-1, seen[name][0].shape[-1]).double()
        assert stats[name].tokens == 40
        torch.testing.assert_close(stats[name].gram, x.T @ x, rtol=1e-4, atol=1e-4)


def test_statistics_without_outputs_stop_after_the_last_target_and_keep_the_same_grams(tiny_llama):
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    _, blocks = decoder_blocks(tiny_llama)
    calib = BlockwiseCalibration(tiny_llama, ids, batch_size=3)
    calib.capture_inputs()
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    full, outputs = calib.statistics(blocks[0], names)
    calls = []
    handle = blocks[0].mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))  # after the linear ran
    try:
        early, none = calib.statistics(blocks[0], names, outputs=False)
    finally:
        handle.remove()
    assert len(outputs) == 2 and none == [] and calls == []  # down_proj's input is taken, its GEMM skipped
    for name in names:
        assert early[name].tokens == full[name].tokens == 40
        assert torch.equal(early[name].gram, full[name].gram), name
    _, rest = calib.statistics(blocks[0], names[:2], outputs=False)  # a pass that stops inside attention
    assert rest == []


def test_expert_grams_come_from_the_tokens_routed_to_each_expert(tiny_mixtral):
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1))
    calib = BlockwiseCalibration(tiny_mixtral, ids)
    calib.capture_inputs()
    _, blocks = decoder_blocks(tiny_mixtral)
    names = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    stats, _ = calib.statistics(blocks[0], names)
    experts = tiny_mixtral.config.num_local_experts
    gate_up = [
        stats[f"mlp.experts.gate_up_proj[{e}]"] for e in range(experts) if f"mlp.experts.gate_up_proj[{e}]" in stats
    ]
    # every token goes to exactly num_experts_per_tok experts
    assert sum(s.tokens for s in gate_up) == 24 * tiny_mixtral.config.num_experts_per_tok
    for e in range(experts):
        key = f"mlp.experts.down_proj[{e}]"
        if key in stats:
            assert (
                stats[key].gram.shape == (48, 48)
                and stats[key].tokens == stats[f"mlp.experts.gate_up_proj[{e}]"].tokens
            )


def test_relative_output_error_matches_the_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    w0, w_hat = torch.randn(7, 12, generator=gen), torch.randn(7, 12, generator=gen)
    direct = float((x @ (w0.double() - w_hat.double()).T).norm() / (x @ w0.double().T).norm())
    assert relative_output_error(w0, w_hat, x.T @ x) == pytest.approx(direct, rel=1e-5)  # a report figure, fp32


def test_output_errors_match_relative_output_error_before_and_after_the_residual():
    torch.manual_seed(3)
    x = torch.randn(200, 24) * torch.rand(24)
    w0, base = torch.randn(10, 24), torch.randn(10, 24) * (torch.rand(10, 24) > 0.5)
    B, A = torch.randn(10, 3), torch.randn(3, 24)
    xd = x.double()
    gram = xd.T @ xd
    before, after = output_errors(w0, base, B, A, gram)
    direct = [
        float(((w0.double() - w_hat.double()) @ xd.T).norm() / (w0.double() @ xd.T).norm())
        for w_hat in (base, base + B @ A)
    ]
    assert before == pytest.approx(direct[0], rel=1e-5)  # products in fp32, sums in fp64
    assert after == pytest.approx(direct[1], rel=1e-5)
    assert before == pytest.approx(relative_output_error(w0, base, gram), rel=1e-12)
    assert output_errors(torch.zeros(10, 24), base, B, A, gram) == (0.0, 0.0)


def test_sampler_check_finds_the_same_nucleus_as_the_warper_and_draws_inside_it(capsys, stories_path):
    spec = importlib.util.spec_from_file_location("sampler_check", ROOT / "experiments" / "sampler_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", str(stories_path), "--samples", "3", "--length", "24", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "kept sets identical at 69 of 69 positions; sampled token inside the nucleus at 69" in out
