"""The server's running batch through the CUDA-graph decoder, on the CPU: tests/graph_replay.py stands in
for capture and replay, and the tiny dense model decodes on its plain torch path (products by the CPU's
kernels), which writes a pinned cache in place as the GPU's fused steps do. Sequences come and go; a
leaver's row goes idle and a newcomer is copied into an idle row, with no new capture, and every sequence
decodes as it does alone."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import serve_greedily
from graph_replay import emulated_cuda_graphs


@pytest.fixture
def plain_path_model(fixtures, monkeypatch):
    """The tiny dense model with paged K/V (as on a GPU) on its plain torch decode path."""
    import qwen35
    from qwen35.kernels import delta_rule
    from qwen35.model import fused

    monkeypatch.setattr(fused, "fast_ops", lambda: None)  # the C++ steps: not recorded as device work
    monkeypatch.setattr(delta_rule, "fast_ops", lambda: None)
    monkeypatch.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})  # paged K/V; fast_cuda is off on a CPU
    return qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf", precision="fast")


def _prompt_ids(fixtures) -> list[int]:
    return json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["text"]["ids"]


def test_graph_rows_vacated_and_installed_decode_as_alone(fixtures, plain_path_model, monkeypatch):
    from qwen35.engine import cuda_graphs
    from qwen35.engine.cache import HybridCache

    model, ids = plain_path_model, _prompt_ids(fixtures)

    def prefilled(length):
        cache = model.make_cache(1)
        model.forward(torch.tensor([ids[:length]]), cache)
        return cache

    def alone(length, steps):
        cache = prefilled(length)
        with torch.inference_mode():
            return torch.stack([model.network(torch.tensor([[ids[length + t]]]), cache)[0, -1] for t in range(steps)])

    expected = {9: alone(9, 6), 15: alone(15, 3), 20: alone(20, 3), 30: alone(30, 1)}
    with emulated_cuda_graphs(monkeypatch), torch.inference_mode():
        decoder = cuda_graphs.GraphDecoder(model, HybridCache.merge([prefilled(9), prefilled(15), model.make_cache(1)]),
                                           capacity=32, idle_rows=[2])
        first_graph = decoder.graph
        got = {9: [], 15: [], 20: [], 30: []}
        for t in range(3):
            logits = decoder.step([ids[9 + t], ids[15 + t], 0])[:, -1]
            got[9].append(logits[0].clone())
            got[15].append(logits[1].clone())
        decoder.vacate(1)  # the 15-token sequence ends; a 20-token one takes the idle row 2
        decoder.install(2, prefilled(20))
        for t in range(3, 6):
            logits = decoder.step([ids[9 + t], 0, ids[20 + t - 3]])[:, -1]
            got[9].append(logits[0].clone())
            got[20].append(logits[2].clone())
        assert decoder.graph is first_graph and decoder.idle == {1}
        decoder.install(1, prefilled(30))  # 31 tokens still fit the capacity
        got[30].append(decoder.step([ids[15], ids[30], ids[23]])[1, -1].clone())
        assert decoder.graph is first_graph
        released = decoder.release()
    assert released.lengths.tolist() == [16, 31, 24]
    for length, logits in got.items():
        torch.testing.assert_close(torch.stack(logits), expected[length], rtol=0, atol=1e-4, msg=str(length))


def test_the_server_batch_keeps_its_graph_as_sequences_come_and_go(fixtures, plain_path_model, monkeypatch):
    from qwen35.engine import cuda_graphs
    from qwen35.engine import running_batch

    model, ids = plain_path_model, _prompt_ids(fixtures)
    prompts = [ids[: 12 + 5 * i] for i in range(7)]
    new_tokens = [14, 4, 9, 6, 12, 3, 8]  # rows leave at different steps and the queue refills them
    solo = [model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True) for p, n in zip(prompts, new_tokens)]

    monkeypatch.setattr(running_batch, "GRAPH_AFTER_STEADY_STEPS", 1)
    captures, installs = [], []
    original_capture, original_install = cuda_graphs.GraphDecoder._capture, cuda_graphs.GraphDecoder.install
    monkeypatch.setattr(cuda_graphs.GraphDecoder, "_capture",
                        lambda self, capacity: (captures.append(self.batch_size), original_capture(self, capacity))[1])
    monkeypatch.setattr(cuda_graphs.GraphDecoder, "install",
                        lambda self, *args: (installs.append(args[0]), original_install(self, *args))[1])

    with emulated_cuda_graphs(monkeypatch):
        assert serve_greedily(model, prompts, new_tokens, max_running=4) == solo
    assert installs  # newcomers took idle rows of a captured graph
    assert captures and max(captures) == 4
    assert captures.count(4) == 1, captures  # the full batch's graph was captured once, however its rows changed


def test_speculation_keeps_the_batch_graph_and_a_sequence_alone_checks_guesses_in_a_captured_step(
        fixtures, plain_path_model, monkeypatch):
    """With speculation on, several sequences decode in the batch's graph (the drafters told what went by),
    and a sequence left alone checks its MTP layer's guesses in a captured verification step, replayed and
    rewound in place: every sequence gets the tokens it gets alone without speculation."""
    from qwen35.engine import cuda_graphs, running_batch
    from qwen35.engine.speculative import Speculation

    model, ids = plain_path_model, _prompt_ids(fixtures)
    prompts, new_tokens = [ids[:12], ids[:17]], [14, 3]  # the second leaves early: the first goes on alone
    solo = [model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True) for p, n in zip(prompts, new_tokens)]

    monkeypatch.setattr(running_batch, "GRAPH_AFTER_STEADY_STEPS", 1)
    captured = {"batch": 0, "verification": 0}
    for name, kind in (("batch", cuda_graphs.GraphDecoder), ("verification", cuda_graphs.VerificationGraph)):
        monkeypatch.setattr(kind, "_capture", lambda self, capacity, _name=name, _original=kind._capture: (
            captured.__setitem__(_name, captured[_name] + 1), _original(self, capacity))[1])
    with emulated_cuda_graphs(monkeypatch):
        served = serve_greedily(model, prompts, new_tokens, max_running=2,
                                speculation=Speculation(draft_max=2, p_min=0.0))
    assert served == solo
    assert captured["verification"] == 1, captured  # captured once the first sequence was alone, kept after
    assert captured["batch"] >= 1, captured  # the two decoded together in the batch's graph


def test_verification_steps_replay_as_eager_ones_across_a_new_capture(fixtures, plain_path_model, monkeypatch):
    """engine/cuda_graphs.VerificationGraph against the eager verification (keep_steps, a forward of the
    tokens, rewind) on a twin cache: the same logits at every fed position and the same states after each
    rewind, for steps that keep all, some or one of their tokens, that feed fewer tokens than the graph's
    (padded), and that outgrow the K/V room (a second capture)."""
    from qwen35.engine import cuda_graphs

    model, ids = plain_path_model, _prompt_ids(fixtures)
    # float32 pages: a graph attends over its whole K/V room, eager steps over what is filled, and bf16 pages
    # can turn those sums' last-bit differences into a K a rounding step apart (and logits 0.1 apart).
    model.cache_type_k = model.cache_type_v = "f32"
    prompt = ids[:10]
    twins = [model.make_cache(1) for _ in range(2)]
    for cache in twins:
        model.forward(torch.tensor([prompt]), cache)
    eager, pinned = twins
    steps = [(ids[10:13], 3), (ids[12:15], 1), (ids[13:14], 1), (ids[14:17], 2), (ids[16:19], 3)]
    captures = []
    monkeypatch.setattr(cuda_graphs.VerificationGraph, "_capture", lambda graph, capacity, _original=cuda_graphs.
                        VerificationGraph._capture: (captures.append(capacity), _original(graph, capacity))[1])
    with emulated_cuda_graphs(monkeypatch), torch.inference_mode():
        graph = cuda_graphs.VerificationGraph(model, pinned, tokens=3, capacity=16)
        for fed, keep in steps:
            eager.keep_steps()
            expected = model.forward(torch.tensor([fed]), eager)[0]
            eager.rewind(len(fed), keep)
            _, logits = graph.step(fed)
            torch.testing.assert_close(logits[0, :len(fed)], expected, rtol=0, atol=1e-4, msg=lambda m: f"{fed}: {m}")
            graph.rewind(keep)
            assert pinned.lengths.tolist() == eager.lengths.tolist() == [graph.host_length]
        released = graph.release()
    assert captures == [16, 32]  # 10 + 4 + 1 + 1 + 2 tokens kept, and a step of 3 more, passed 16
    for got, expected in zip(released.layers, eager.layers):
        if hasattr(got, "recurrent"):
            assert not got.in_place
            torch.testing.assert_close(got.recurrent, expected.recurrent, rtol=0, atol=1e-5)
        else:
            for ours, theirs in zip(got.view(int(eager.lengths[0])), expected.view(int(eager.lengths[0]))):
                torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-5)


def test_the_mtp_layers_guesses_from_a_captured_chain_are_its_eager_guesses(fixtures, plain_path_model, monkeypatch):
    """engine/cuda_graphs.GuessGraph: an MTP drafter whose chain of guesses is captured (after one eager
    chain here) guesses what an eager drafter fed the same pairs guesses, step after step, its cache holding
    the same pairs; and a generation speculating through it (and through VerificationGraph) gives plain
    decoding's tokens."""
    from qwen35.engine import cuda_graphs, speculative
    from qwen35.engine.speculative import Speculation

    model, ids = plain_path_model, _prompt_ids(fixtures)
    monkeypatch.setattr(speculative, "GUESS_GRAPH_AFTER", 1)
    captures = []
    monkeypatch.setattr(cuda_graphs.GuessGraph, "_chain", lambda graph, cache, _original=cuda_graphs.GuessGraph.
                        _chain: (captures.append(cache is graph.cache), _original(graph, cache))[1])
    settings = Speculation(draft_max=3, p_min=0.0)
    with torch.inference_mode():
        cache = model.make_cache(1)
        hidden = model.network.hidden_states(torch.tensor([ids[:12]]), cache)
        eager = speculative.MtpDrafter(speculative.mtp_predictor(model), settings, 0)
        eager.feed(ids[:12], hidden)
    with emulated_cuda_graphs(monkeypatch), torch.inference_mode():
        graphed = speculative.MtpDrafter(speculative.mtp_predictor(model), settings, 0, graphs=True)
        graphed.feed(ids[:12], hidden)
        for step, (token, kept) in enumerate([(ids[12], 2), (ids[14], 1), (ids[15], 3), (ids[18], 1)]):
            # as a verification step hands them over: the token and kept tokens' hidden states
            expected = eager.propose(token, limit=3 if step != 1 else 2)
            assert graphed.propose(token, limit=3 if step != 1 else 2) == expected, step
            assert graphed.cache.lengths.tolist() == eager.cache.lengths.tolist()
            fed = ids[12 + step: 12 + step + kept]
            states = torch.randn(1, kept, model.config.hidden_size, generator=torch.Generator().manual_seed(step))
            for drafter in (eager, graphed):
                drafter.feed(fed, states)
        assert graphed.graph is not None and captures.count(True) == 1  # captured once, replayed after
        length = int(eager.cache.lengths[0])
        for ours, theirs in zip(graphed.cache.layers[0].view(length), eager.cache.layers[0].view(length)):
            torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-2)

        plain = model.generate(ids[:12], max_new_tokens=12, temperature=0, ignore_eos=True)
        assert model.generate(ids[:12], max_new_tokens=12, temperature=0, ignore_eos=True,
                              speculation=Speculation(draft_max=2, p_min=0.0)) == plain


def test_a_draft_models_graphed_guesses_are_its_eager_guesses(fixtures, plain_path_model, monkeypatch):
    """A draft model (here a second copy of the model) whose one-token steps come from a CUDA graph after its
    first proposals guesses what an eager one guesses, keeps the states of the guesses the model keeps (put
    back in place), and speculative generation through it gives plain decoding's tokens."""
    import qwen35
    from qwen35.engine import cuda_graphs, speculative
    from qwen35.engine.speculative import Speculation

    model, ids = plain_path_model, _prompt_ids(fixtures)
    draft = qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf", precision="fast")
    monkeypatch.setattr(speculative, "GUESS_GRAPH_AFTER", 1)
    captures = []
    monkeypatch.setattr(cuda_graphs.GraphDecoder, "_capture", lambda decoder, capacity, _original=cuda_graphs.
                        GraphDecoder._capture: (captures.append(decoder.cache), _original(decoder, capacity))[1])
    settings = Speculation(draft_model=draft, draft_max=3, p_min=0.0)
    prompt = ids[:12]
    with torch.inference_mode():
        eager = speculative.DraftModelDrafter(draft, settings, prompt)
        with emulated_cuda_graphs(monkeypatch):
            graphed = speculative.DraftModelDrafter(draft, settings, prompt, graphs=True)
            # the model's tokens after each step: the first guess kept, none, all three, one of two
            for step, (token, kept) in enumerate([(ids[12], 1), (ids[14], 0), (ids[15], 3), (ids[19], 1)]):
                expected = eager.propose(token, limit=3 if step != 3 else 2)
                assert graphed.propose(token, limit=3 if step != 3 else 2) == expected, step
                taken = [token] + expected[:kept] + ([ids[30]] if kept < len(expected) else [])
                for drafter in (eager, graphed):
                    drafter.feed(taken, None)
            assert graphed.decoder is not None and captures and captures[0] is graphed.cache
            graphed._read(graphed.unfed)
            eager._read(eager.unfed)
            graphed.unfed = eager.unfed = []
            assert graphed.cache.lengths.tolist() == eager.cache.lengths.tolist()
            for got, expected in zip(graphed.cache.layers, eager.cache.layers):
                if hasattr(got, "recurrent"):
                    torch.testing.assert_close(got.recurrent, expected.recurrent, rtol=0, atol=1e-4)
            graphed.release()
            assert not any(getattr(layer, "in_place", False) for layer in graphed.cache.layers)

            plain = model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True)
            assert model.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True,
                                  speculation=Speculation(draft_model=draft, draft_max=3, p_min=0.0)) == plain
