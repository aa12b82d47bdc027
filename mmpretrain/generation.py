"""Caption generation: greedy, beam search and top-k / top-p sampling, batched, with max / min
length, repetition penalty and a key/value cache for the text tower and the decoder.

The search functions only see a `DecodeState` (last token in, next-token logits out, rows
re-indexable), so they are tested on small hand-made models as well as on the real one."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F

from mmpretrain.config import GenerationConfig


class DecodeState(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N,) = each row's newest token -> logits (N, V) for the token after it."""

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (N',) in that order (rows may repeat: beam expansion)."""


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, T) generated ids without BOS / EOS, padded with pad_id
    lengths: torch.Tensor  # (B,) ids before EOS (or all, if no EOS within max_new_tokens)
    scores: torch.Tensor  # (B,) sum of log-probabilities (beam: the length-normalized beam score)
    finished: torch.Tensor  # (B,) bool: ended with EOS


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float,
                             ignore_id: Optional[int] = None) -> torch.Tensor:
    """CTRL penalty: for ids already in `previous` (N, t), logit / penalty if > 0 else logit * penalty."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    prev = previous
    if ignore_id is not None:  # pad after EOS: point it at an id already in the row
        prev = torch.where(previous == ignore_id, previous[:, :1], previous)
    picked = logits.gather(1, prev)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, prev, picked)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the top-k logits and outside the smallest set whose probability reaches top_p
    (the most likely token always stays). logits (N, V)."""
    out = logits
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = out.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _process(logits: torch.Tensor, seqs: torch.Tensor, t: int, cfg: GenerationConfig, eos_id: int,
             pad_id: Optional[int], suppress: Sequence[int]) -> torch.Tensor:
    logits = logits.float()
    logits = apply_repetition_penalty(logits, seqs, cfg.repetition_penalty, pad_id)
    if suppress:
        logits[:, list(suppress)] = float("-inf")
    if t < cfg.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    return logits


# ----------------------------------------------------------------------------- search


@torch.no_grad()
def generate(state: DecodeState, batch_size: int, bos_id: int, eos_id: int, pad_id: int,
             cfg: Optional[GenerationConfig] = None, suppress: Sequence[int] = (),
             device: Optional[torch.device] = None) -> Generated:
    """Decode `batch_size` rows from BOS; `state` holds one row per batch item (beam search
    expands it). Greedy when num_beams == 1 and not do_sample; `suppress`: ids never generated."""
    cfg = cfg or GenerationConfig()
    if cfg.num_beams > 1:
        if cfg.do_sample:
            raise ValueError("beam search with sampling is not supported; set num_beams=1 or do_sample=false")
        return _beam_search(state, batch_size, bos_id, eos_id, pad_id, cfg, suppress, device)
    gen = None
    if cfg.do_sample:
        gen = torch.Generator(device=device or "cpu").manual_seed(cfg.seed)
    cur = torch.full((batch_size,), bos_id, dtype=torch.long, device=device)
    seqs = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for t in range(cfg.max_new_tokens):
        logits = _process(state.step(cur), seqs, t, cfg, eos_id, pad_id, suppress)
        if cfg.do_sample:
            logits = logits / cfg.temperature
            logp = logits.log_softmax(-1)
            probs = top_k_top_p_filter(logits, cfg.top_k, cfg.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            logp = logits.log_softmax(-1)
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        scores = scores + torch.where(done, torch.zeros_like(scores), logp.gather(1, nxt[:, None]).squeeze(1))
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        cur = nxt
    return _pack([row.tolist() for row in seqs], scores, eos_id, pad_id, device)


def _pack(rows: List[List[int]], scores: torch.Tensor, eos_id: int, pad_id: int,
          device: Optional[torch.device]) -> Generated:
    out, lens, fin = [], [], []
    for r in rows:
        cut = r.index(eos_id) if eos_id in r else len(r)
        out.append(r[:cut])
        lens.append(cut)
        fin.append(cut < len(r))
    width = max([len(r) for r in out] + [0])
    toks = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(out):
        toks[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Generated(toks.to(device), torch.tensor(lens, device=device), scores.to(device),
                     torch.tensor(fin, dtype=torch.bool, device=device))


def _norm(score: float, length: int, lp: float) -> float:
    return score / (max(length, 1) ** lp)


def _beam_search(state: DecodeState, batch_size: int, bos_id: int, eos_id: int, pad_id: int,
                 cfg: GenerationConfig, suppress: Sequence[int], device: Optional[torch.device]) -> Generated:
    """Beam search; a hypothesis' score is sum log p / length ** length_penalty (length counts
    EOS). An item stops once it has num_beams finished hypotheses and no live beam can still
    beat the worst of them (an exact bound, so with enough beams the search is exhaustive)."""
    K, B, lp, T = cfg.num_beams, batch_size, cfg.length_penalty, cfg.max_new_tokens
    state.select(torch.arange(B, device=device).repeat_interleave(K))
    beam = torch.full((B, K), float("-inf"), device=device)
    beam[:, 0] = 0.0  # the first step expands one beam per item
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=device)
    cur = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    hyps: List[List[Tuple[float, float, List[int]]]] = [[] for _ in range(B)]  # (normalized, raw, tokens)
    done = [False] * B
    for t in range(T):
        logits = _process(state.step(cur), seqs, t, cfg, eos_id, pad_id, suppress)
        V = logits.shape[-1]
        cand = (beam.view(-1, 1) + logits.log_softmax(-1)).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        new_s = [[float("-inf")] * K for _ in range(B)]
        new_src = [[0] * K for _ in range(B)]
        new_tok = [[pad_id] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            k = 0
            for j, (s, ix) in enumerate(zip(top_s[b], top_i[b])):
                if s == float("-inf") or k == K:
                    break
                src, tok = divmod(ix, V)
                if tok == eos_id:
                    if j < K:
                        hyps[b].append((_norm(s, t + 1, lp), s, seqs[b * K + src].tolist()))
                else:
                    new_s[b][k], new_src[b][k], new_tok[b][k] = s, src, tok
                    k += 1
            if len(hyps[b]) >= K:
                hyps[b] = sorted(hyps[b], key=lambda h: -h[0])[:K]
                best_live = new_s[b][0]
                # the best normalized score any continuation could reach (its sum only decreases)
                bound = max(_norm(best_live, n, lp) for n in (t + 2, max(T, t + 2)))
                done[b] = best_live == float("-inf") or bound <= hyps[b][-1][0]
        if all(done):
            break
        idx = torch.tensor([b * K + new_src[b][k] for b in range(B) for k in range(K)], device=device)
        tok = torch.tensor([new_tok[b][k] for b in range(B) for k in range(K)], device=device)
        state.select(idx)
        seqs = torch.cat([seqs.index_select(0, idx), tok[:, None]], 1)
        beam = torch.tensor(new_s, device=device)
        cur = tok
    best_rows, best_scores = [], []
    for b in range(B):
        pool = [(n, r + [eos_id]) for n, _, r in hyps[b]]
        if not done[b]:  # max length reached: unfinished live beams compete too
            pool += [(_norm(float(beam[b, k]), seqs.shape[1], lp), seqs[b * K + k].tolist())
                     for k in range(K) if float(beam[b, k]) > float("-inf")]
        n, r = max(pool, key=lambda h: h[0])
        best_rows.append(r)
        best_scores.append(n)
    return _pack(best_rows, torch.tensor(best_scores), eos_id, pad_id, device)


# ----------------------------------------------------------------------------- the real model


class CaptionState:
    """Incremental decoding of a MultimodalModel through its own modules: the text tower and the
    decoder run their ordinary forward with a key / value cache (models.transformer.DecodeCache),
    so decoding can never drift from training."""

    def __init__(self, model: torch.nn.Module, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> None:
        self.text, self.dec = model.caption_text, model.decoder
        self.ctx, self.ctx_mask = ctx, ctx_mask
        self.text_cache, self.dec_cache = self.text.new_cache(), self.dec.new_cache()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_cache.offset >= self.text.context_len:
            raise ValueError(f"caption longer than the text context ({self.text.context_len} tokens)")
        _, states = self.text(tokens[:, None], cache=self.text_cache)  # (N, 1, W)
        return self.dec(states, self.ctx, self.ctx_mask, cache=self.dec_cache)[:, 0]  # (N, V)

    def select(self, index: torch.Tensor) -> None:
        self.ctx, self.ctx_mask = self.ctx.index_select(0, index), self.ctx_mask.index_select(0, index)
        self.text_cache.select(index)
        self.dec_cache.select(index)


def caption_context(model: torch.nn.Module, inputs: Dict[str, torch.Tensor],
                    masks: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder memory from batch inputs of captioned modalities (e.g. images (B, 3, H, W));
    masks[m] (B,) marks which rows have modality m (default: all)."""
    if model.decoder is None:
        raise ValueError("this model has no caption decoder (model.text.decoder_depth = 0)")
    unknown = set(inputs) - set(model.decoder.modalities)
    if unknown:
        raise ValueError(f"cannot caption {sorted(unknown)}; the decoder reads {model.decoder.modalities}")
    tokens = {m: model.encode(m, x, return_tokens=True)[1] for m, x in inputs.items() if x is not None}
    return model.caption_context(tokens, masks)


def decoder_logits(model: torch.nn.Module, tokens: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
    """Full (uncached) next-token logits (B, L, V) for token prefixes (B, L) starting with BOS."""
    _, states = model.caption_text(tokens)
    return model.decoder(states, ctx, ctx_mask)


@torch.no_grad()
def generate_ids(model: torch.nn.Module, bos_id: int, eos_id: int, pad_id: int, inputs: Dict[str, torch.Tensor],
                 masks: Optional[Dict[str, Optional[torch.Tensor]]] = None,
                 cfg: Optional[GenerationConfig] = None) -> Generated:
    """Caption token ids for a batch of inputs of one or more captioned modalities (cross-attending
    to all given). max_new_tokens is capped by the text context length."""
    cfg = cfg or GenerationConfig()
    was = model.training
    model.eval()
    try:
        ctx, mask = caption_context(model, inputs, masks)
        limit = model.caption_text.context_len - 1  # BOS takes position 0
        if cfg.max_new_tokens > limit:
            cfg = replace(cfg, max_new_tokens=limit)
        state = CaptionState(model, ctx, mask)
        return generate(state, ctx.shape[0], bos_id, eos_id, pad_id, cfg, suppress=(bos_id, pad_id), device=ctx.device)
    finally:
        model.train(was)


def generate_captions(model: torch.nn.Module, tokenizer, inputs: Dict[str, torch.Tensor],
                      cfg: Optional[GenerationConfig] = None,
                      masks: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> List[str]:
    """Captions as strings (see generate_ids)."""
    out = generate_ids(model, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, inputs, masks, cfg)
    return [tokenizer.decode(out.tokens[i, : int(out.lengths[i])].tolist()) for i in range(out.tokens.shape[0])]


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over positions; logits (B, T, V), targets (B, T), -100 = ignore."""
    logp = F.log_softmax(logits.float(), -1)
    ok = targets >= 0
    lp = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(ok, lp, torch.zeros_like(lp)).sum(-1)


__all__ = [
    "CaptionState", "DecodeState", "Generated", "apply_repetition_penalty", "caption_context", "decoder_logits",
    "generate", "generate_captions", "generate_ids", "sequence_logprob", "top_k_top_p_filter",
]
