"""Speculative decoding: a cheap drafter guesses the next few tokens, one step of the model checks them.

Each step feeds the last sampled token and up to `draft_max` guesses [x, d1 .. dk] to the model at once
(its products read every weight once for all of them), then samples position by position with the
request's own sampler: while the sampled token equals the next guess, the guess is kept and sampling
goes on; the first token that differs, or the one after the last guess, ends the step. Every output
token is thus sampled from the same logits, with the same random draws, as plain one-token decoding
would sample it: the output is the same token for token (seeded sampling included), only sooner.

The guesses the model did not keep must leave no trace: the cache keeps the DeltaNet state after each
token of the step and is rewound to the last one kept (`HybridCache.keep_steps` / `rewind`), and the
step feeds its tokens to each mixer one at a time, so what is kept was computed exactly as one-token
steps compute it.

Drafters:
- `MtpDrafter`: the model's own MTP layer (model/mtp.py), chained for more than one guess
  (llama.cpp's `--spec-type draft-mtp`, vLLM's `qwen3_next_mtp`).
- `DraftModelDrafter`: a smaller model of the family with the same vocabulary (llama.cpp's `-md`).
A guess is made only while the drafter's own probability for it is at least `p_min` (llama.cpp's
`--draft-p-min`), and a step with fewer than `draft_min` guesses checks none. With `vocabulary` N the
drafter's output head reads only the first N token rows (model/mtp.py `first_rows`): its guesses cost
less, and a guess of a rarer token is never made (the model itself still samples from all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.errors import Qwen35Error
from qwen35.speculation_options import DRAFT_MODEL_DEFAULTS, MTP_DEFAULTS

# Guesses a drafter makes eagerly before its guessing is captured (where the device captures graphs).
GUESS_GRAPH_AFTER = 8
# Tokens a draft model reads one graphed step at a time (more: eagerly, in pieces, the graph released).
GRAPHED_READ_MAX = 4


@dataclass(frozen=True)
class Speculation:
    """How to speculate: the model's MTP layer (`draft_model` None) or a draft model."""

    draft_model: object | None = None  # a model.api.Model
    draft_max: int | None = None  # None: llama.cpp's default for the drafter (MTP_DEFAULTS, DRAFT_MODEL_DEFAULTS)
    draft_min: int = 0
    p_min: float | None = None
    vocabulary: int = 0  # guesses among the first N tokens only (0: all): a cheaper output head for the guesser

    def __post_init__(self) -> None:
        defaults = MTP_DEFAULTS if self.draft_model is None else DRAFT_MODEL_DEFAULTS
        if self.draft_max is None:
            object.__setattr__(self, "draft_max", defaults[0])
        if self.p_min is None:
            object.__setattr__(self, "p_min", defaults[1])
        if not 1 <= self.draft_max <= 64:
            raise Qwen35Error(f"--draft-max must be between 1 and 64, got {self.draft_max}")
        if not 0 <= self.draft_min <= self.draft_max:
            raise Qwen35Error(f"--draft-min must be between 0 and --draft-max ({self.draft_max}), got {self.draft_min}")
        if not 0.0 <= self.p_min <= 1.0:
            raise Qwen35Error(f"--draft-p-min must be between 0 and 1, got {self.p_min}")
        if self.vocabulary < 0:
            raise Qwen35Error(f"--draft-vocab must be 0 (all tokens) or a number of tokens, got {self.vocabulary}")

    @property
    def name(self) -> str:
        return "draft-mtp" if self.draft_model is None else "draft"

    def check(self, model) -> None:
        """Fail now, with one line, where this speculation cannot run on `model`."""
        if self.draft_model is None:
            mtp_predictor(model, self.vocabulary)
            return
        if self.draft_model.config.vocab_size != model.config.vocab_size:
            raise Qwen35Error(f"the draft model's vocabulary ({self.draft_model.config.vocab_size} tokens) is not the "
                              f"model's ({model.config.vocab_size}): a draft must be of the same family "
                              "(e.g. Qwen3.5-0.8B for Qwen3.5-27B)")

    def drafter(self, model, cached_ids: list[int], state=None):
        """A drafter for one generation whose cache already holds `cached_ids`; `state`: a drafter's
        `snapshot()` taken when it had read exactly those tokens (a restored prefix brings its drafter's)."""
        from qwen35.engine.cuda_graphs import graphs_supported

        if self.draft_model is None:
            return MtpDrafter(mtp_predictor(model, self.vocabulary), self, len(cached_ids), state,
                              graphs=graphs_supported(model))
        return DraftModelDrafter(self.draft_model, self, cached_ids, state, graphs=graphs_supported(self.draft_model))


def mtp_predictor(model, vocabulary: int = 0):
    """The model's MTP layer with its output head cut to `vocabulary` tokens (0: all), made once (model/mtp.py)."""
    predictors = model.__dict__.setdefault("_mtp_predictors", {})
    if vocabulary not in predictors:
        from qwen35.model.mtp import MultiTokenPredictor

        predictors[vocabulary] = MultiTokenPredictor(model.network, vocabulary, model.kv_settings())
    return predictors[vocabulary]


def _released(graph) -> None:
    """None, after handing back the cache a graph (engine/cuda_graphs.py) pinned, if there is one."""
    if graph is not None:
        graph.release()


def _confident_guess(logits: torch.Tensor, p_min: float) -> tuple[int, bool]:
    """The drafter's top token of logits [vocab], and whether its probability reaches p_min."""
    token = int(logits.argmax())
    if p_min <= 0.0:
        return token, True
    probability = float(torch.softmax(logits, dim=-1)[token])
    return token, probability >= p_min


class MtpDrafter:
    """Guesses from the MTP layer. It reads pairs (the model's hidden state at i, the token at i+1), so it
    runs one token behind the model: `feed` pairs what the model consumed, `propose` pairs the newest.
    Where the model's device captures steps, a drafter that keeps guessing gets its chain of guesses as a
    CUDA graph (engine/cuda_graphs.py GuessGraph), after GUESS_GRAPH_AFTER eager ones."""

    def __init__(self, predictor, settings: Speculation, start_position: int, state=None, graphs: bool = False):
        self.predictor = predictor
        self.settings = settings
        self.cache = predictor.make_cache(start_position)
        self.pending: torch.Tensor | None = None  # the hidden state of the last token fed, not yet paired
        if state is not None:
            cache, self.pending = state
            self.cache = cache.select([0])
        self.graphs = graphs
        self.graph = None
        self._proposals = 0

    def snapshot(self, copy: bool = True):
        """This drafter's state, to restore with `Speculation.drafter(..., state=)`. Without `copy` a view
        that stays valid while this drafter only goes on (its K/V grows past it)."""
        cache = self.cache.select([0]) if copy else self.cache.shared()
        return cache, self.pending

    @staticmethod
    def snapshot_bytes(state) -> int:
        return state[0].nbytes() + (state[1].nbytes if state[1] is not None else 0)

    def feed(self, token_ids: list[int], hidden: torch.Tensor) -> None:
        """The model consumed `token_ids` (kept), with final hidden states `hidden` [1, T, H]."""
        if self.pending is not None:
            hiddens, following = torch.cat([self.pending, hidden[:, :-1]], dim=1), token_ids
        else:
            hiddens, following = hidden[:, :-1], token_ids[1:]
        if following:
            if self.graph is not None and not self.graph.fits(int(self.cache.lengths[0]) + len(following)):
                self.release()  # (a next turn's prompt) its K/V outgrows the graph's room: eager until a new one
            ids = torch.tensor([following], dtype=torch.long)
            self.predictor(hiddens, ids, self.cache, logits=False)
        self.pending = hidden[:, -1:].clone()  # (the model's hidden states may be a graph's buffer)

    def skip(self, token_ids: list[int]) -> None:
        """The model consumed `token_ids` without handing over their hidden states (a batched step of a
        server): their pairs are left out of the layer's attention, whose positions go on past them."""
        skipped = len(token_ids) + (1 if self.pending is not None else 0)
        if self.graph is not None:  # in place: the graph reads it
            with torch.inference_mode():
                self.cache.next_positions.add_(skipped)
        else:
            self.cache.next_positions = self.cache.next_positions + skipped
        self.pending = None

    def propose(self, next_token: int, limit: int) -> list[int]:
        """Up to `limit` guesses of the tokens after `next_token` (the model's last sampled token)."""
        if self.pending is None or limit < 1:
            return []
        self._proposals += 1
        graph = self._graph()
        if graph is not None:
            tokens, probabilities = graph.propose(self.pending, next_token)
            self.pending = None
            guesses = []
            for token, probability in zip(tokens[:limit], probabilities):
                if probability < self.settings.p_min:
                    break
                guesses.append(token)
            return guesses
        logits, out = self.predictor(self.pending, torch.tensor([[next_token]]), self.cache)
        self.pending = None  # paired with next_token: that pair stays in the cache
        guesses, chained = [], 0
        while True:
            token, confident = _confident_guess(logits[0, -1], self.settings.p_min)
            if not confident:
                break
            guesses.append(token)
            if len(guesses) >= limit:
                break
            logits, out = self.predictor(out, torch.tensor([[token]]), self.cache)
            chained += 1
        if chained:  # pairs of the layer's own guesses: the next step pairs the model's real hidden states
            self.cache.rewind(chained, 0)
        return guesses

    def _graph(self):
        """The captured chain, once this drafter has guessed GUESS_GRAPH_AFTER times eagerly (a capture
        costs as much as a few dozen chains) and where the model's device captures; else None."""
        if self.graph is not None and not self.graph.fits(int(self.cache.lengths[0])):
            self.release()
        if self.graph is None and self.graphs and self._proposals > GUESS_GRAPH_AFTER:
            from qwen35.engine.cuda_graphs import GuessGraph, room_for

            self.graph = GuessGraph(self.predictor, self.cache, self.settings.draft_max,
                                    room_for(int(self.cache.lengths[0])))
        return self.graph

    def release(self) -> None:
        """The layer's cache as an ordinary one again (no graph pins it)."""
        self.graph = _released(self.graph)


def propose_together(drafters: list, next_tokens: list[int], limits: list[int]) -> list[list[int]]:
    """`drafters[i].propose(next_tokens[i], limits[i])` for every drafter (None: no guesses), with the MTP
    drafters of one layer guessing in rounds: each row's pass of the MTP layer over its own cache, then one
    pass of the output head for all of them. The head is most of a guess's price and reads its weights
    once for every row, so a batch's guesses cost about one row's (a server's batch: speculative_steps.py).
    The same guesses as alone: the head's products are the same for a row in any batch."""
    results: list[list[int]] = [[] for _ in drafters]
    rounds: dict[int, list] = {}  # id(predictor) -> [row, drafter, out, chained] still guessing
    for row, (drafter, token, limit) in enumerate(zip(drafters, next_tokens, limits)):
        if not isinstance(drafter, MtpDrafter) or drafter.graphs:  # (a GPU's MTP chain is a graph of its own)
            results[row] = drafter.propose(token, limit) if drafter is not None else []
        elif drafter.pending is not None and limit >= 1:
            drafter._proposals += 1
            _, out = drafter.predictor(drafter.pending, torch.tensor([[token]]), drafter.cache, logits=False)
            drafter.pending = None  # paired with the token: that pair stays in the cache
            rounds.setdefault(id(drafter.predictor), []).append([row, drafter, out, 0])
    for guessing in rounds.values():
        head = guessing[0][1].predictor.head
        while guessing:
            logits = head(torch.cat([out for _, _, out, _ in guessing])).float()  # [rows, 1, vocab]
            going_on = []
            for (row, drafter, out, chained), row_logits in zip(guessing, logits):
                token, confident = _confident_guess(row_logits[-1], drafter.settings.p_min)
                if confident:
                    results[row].append(token)
                if confident and len(results[row]) < limits[row]:
                    _, out = drafter.predictor(out, torch.tensor([[token]]), drafter.cache, logits=False)
                    going_on.append([row, drafter, out, chained + 1])
                elif chained:  # the layer's own guesses' pairs: the next step pairs the model's real states
                    drafter.cache.rewind(chained, 0)
            guessing = going_on
    return results


class DraftModelDrafter:
    """Guesses from a draft model fed the same tokens as the model, greedily, one at a time. Where the
    device captures steps, a drafter that keeps guessing reads its one-token steps from a CUDA graph
    (engine/cuda_graphs.py GraphDecoder), after GUESS_GRAPH_AFTER eager proposals: it keeps the DeltaNet
    states after each guess itself, to put back those of the tokens the model keeps."""

    def __init__(self, draft_model, settings: Speculation, cached_ids: list[int], state=None, graphs: bool = False):
        from qwen35.model.mtp import first_rows

        self.draft = draft_model
        self.settings = settings
        heads = draft_model.__dict__.setdefault("_draft_heads", {})
        if settings.vocabulary not in heads:
            heads[settings.vocabulary] = first_rows(draft_model.network.lm_head, settings.vocabulary)
        self.head = heads[settings.vocabulary]
        self.cache = draft_model.make_cache(1) if state is None else state.select([0])
        read = int(self.cache.lengths[0])
        self.unfed: list[int] = list(cached_ids[read:])  # tokens the model holds that the draft has not read yet
        self.speculative: list[int] = []  # tokens the draft read while guessing: kept only if the model keeps them
        self.graphs = graphs
        self.decoder = None  # the draft's graphed one-token step
        self._states: list = []  # with a decoder: the DeltaNet states before each token read while guessing
        self._proposals = 0

    def snapshot(self, copy: bool = True):
        """The draft's cache after every token fed so far (read now if need be); see MtpDrafter.snapshot."""
        if self.unfed:
            self._read(self.unfed)
            self.unfed = []
        return self.cache.select([0]) if copy else self.cache.shared()

    @staticmethod
    def snapshot_bytes(state) -> int:
        return state.nbytes()

    def _read(self, token_ids: list[int], logits: bool = False):
        if self.decoder is not None and len(token_ids) > GRAPHED_READ_MAX:
            self.release()  # (a next turn's prompt) read eagerly, in pieces
        if self.decoder is not None:  # (it captures again, with twice the room, when a row fills it)
            for token in token_ids:
                out = self.decoder.step([token])[0, -1]
            vocabulary = self.settings.vocabulary  # its graph's head has every row: the guess reads the first
            return (out[:vocabulary] if vocabulary else out).float() if logits else None
        network, chunk = self.draft.network, self.draft.prefill_chunk
        device = network.input_device
        hidden = None
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor([token_ids[start:start + chunk]], dtype=torch.long, device=device)
            hidden = network.hidden_states(ids, self.cache)
        return self.head(hidden[:, -1:]).float()[0, -1] if logits else None

    def feed(self, token_ids: list[int], hidden: torch.Tensor) -> None:
        if self.speculative:
            kept = 0
            while kept < min(len(token_ids), len(self.speculative)) and token_ids[kept] == self.speculative[kept]:
                kept += 1
            if self.decoder is not None:
                self._put_back(kept)
            else:
                self.cache.rewind(len(self.speculative), kept)
            token_ids = token_ids[kept:]
            self.speculative = []
        self.unfed.extend(token_ids)

    def skip(self, token_ids: list[int]) -> None:
        self.feed(token_ids, None)  # the draft reads them itself, at its next guess

    def propose(self, next_token: int, limit: int) -> list[int]:
        if limit < 1:
            return []
        self._proposals += 1
        if self.decoder is None and self.graphs and self._proposals > GUESS_GRAPH_AFTER:
            from qwen35.engine.cuda_graphs import GraphDecoder, room_for

            if self.unfed:  # read eagerly before the capture: the graph starts after them
                self._read(self.unfed)
                self.unfed = []
            self.decoder = GraphDecoder(self.draft, self.cache, room_for(int(self.cache.lengths[0])))
        if self.unfed:
            self._read(self.unfed)
            self.unfed = []
        if self.decoder is None:
            self.cache.keep_steps()
        guesses, token = [], next_token
        while True:
            self.speculative.append(token)
            if self.decoder is not None:
                self._states.append(self._deltanet_states())
            guess, confident = _confident_guess(self._read([token], logits=True), self.settings.p_min)
            if not confident:
                break
            guesses.append(guess)
            if len(guesses) >= limit:
                break
            token = guess
        return guesses

    def _deltanet_states(self) -> list:
        return [(layer.conv.clone(), layer.recurrent.clone()) for layer in self.cache.layers if hasattr(layer, "recurrent")]

    def _put_back(self, kept: int) -> None:
        """Keep the first `kept` tokens read while guessing (the decoder's cache is written in place)."""
        dropped = len(self.speculative) - kept
        if dropped:
            layers = [layer for layer in self.cache.layers if hasattr(layer, "recurrent")]
            with torch.inference_mode():
                for layer, (conv, recurrent) in zip(layers, self._states[kept]):
                    layer.store(conv, recurrent)
            self.decoder.drop(dropped)
        self._states = []

    def release(self) -> None:
        """The draft's cache as an ordinary one again (no graph pins it). Called between steps only, when
        no guess waits to be checked (`feed` has settled them)."""
        self.decoder = _released(self.decoder)


class SpeculativeDecoder:
    """Prefill and decode steps of one sequence with speculation (see the module's note)."""

    def __init__(self, model, cache, settings: Speculation, cached_ids: list[int], stop_token_ids: set[int],
                 drafter=None):
        self.model = model
        self.network = model.network
        self.cache = cache
        self.settings = settings
        self.stop_token_ids = stop_token_ids
        self.drafter = drafter if drafter is not None else settings.drafter(model, cached_ids)
        self.drafted = 0  # guesses checked
        self.accepted = 0  # guesses kept
        self.graph = None  # on a GPU: the captured verification step (engine/cuda_graphs.py), from the first step

    def _ids(self, token_ids: list[int]) -> torch.Tensor:
        return torch.tensor([token_ids], dtype=torch.long, device=self.network.input_device)

    @torch.inference_mode()
    def prefill(self, prompt: list[int], start: int, chunk: int) -> torch.Tensor:
        """Feed prompt[start:] in pieces of `chunk` tokens; the logits [1, vocab] after its last token."""
        for begin in range(start, len(prompt), chunk):
            piece = prompt[begin:begin + chunk]
            hidden = self.network.hidden_states(self._ids(piece), self.cache)
            self.drafter.feed(piece, hidden)
        return self.network.lm_head(hidden[:, -1:]).float()[:, -1]

    @torch.inference_mode()
    def step(self, token_id: int, sample_one, room: int, finished=None) -> list[int]:
        """Feed `token_id` and the drafter's guesses; the tokens sampled (1 to guesses + 1), at most `room`.
        `sample_one(logits [1, vocab])` samples one position (the request's sampler and constraint);
        `finished()`, after a token, says that the reply ends there (a completed grammar)."""
        guesses = self.drafter.propose(token_id, min(self.settings.draft_max, room - 1))
        if len(guesses) < self.settings.draft_min:
            guesses = []
        fed = [token_id] + guesses
        graph = self._graph()
        if graph is not None:
            hidden, logits = graph.step(fed)
        else:
            if guesses:
                self.cache.keep_steps()
            hidden = self.network.hidden_states(self._ids(fed), self.cache)
            logits = self.network.lm_head(hidden).float()
        sampled = []
        for position in range(len(fed)):
            token = sample_one(logits[:, position])
            sampled.append(token)
            if (position == len(guesses) or token != guesses[position] or token in self.stop_token_ids
                    or (finished is not None and finished())):
                break
        kept = len(sampled)  # the token fed first and the guesses that were sampled
        if graph is not None:
            graph.rewind(kept)
            hidden = hidden[:, :kept].clone()  # the graph's output is written over by its next step
        elif guesses:
            self.cache.rewind(len(fed), kept)
        self.drafted += len(guesses)
        self.accepted += kept - 1
        self.drafter.feed(fed[:kept], hidden[:, :kept])
        return sampled

    def _graph(self):
        """The verification graph where the model's device captures steps (made at the first step, its K/V
        room for the next stretch of the answer; it doubles as the answer goes on), else None."""
        if self.graph is None:
            from qwen35.engine.cuda_graphs import VerificationGraph, graphs_supported, room_for

            if not graphs_supported(self.model):
                return None
            self.graph = VerificationGraph(self.model, self.cache, 1 + self.settings.draft_max,
                                           room_for(int(self.cache.lengths[0])))
        return self.graph

    def release(self) -> None:
        """Hand the cache back as an ordinary one (after the last step, where a graph pinned it)."""
        self.graph = _released(self.graph)
