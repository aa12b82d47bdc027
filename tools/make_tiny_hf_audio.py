"""Write tiny, randomly initialised HuggingFace audio encoders (AST, Whisper, wav2vec2, HuBERT)
with their feature extractors into local directories, built from configs (nothing is downloaded).
They stand in for real checkpoints in tests and demos of `model.audio.kind: hf`.

Example: python tools/make_tiny_hf_audio.py --out /tmp/tiny_hf_audio
  -> /tmp/tiny_hf_audio/{ast,whisper,wav2vec2,hubert}/ (config.json, model.safetensors,
     preprocessor_config.json), each usable as `model.audio.hf_path` with data.audio.sample_rate
     16000 and data.audio.clip_seconds <= 1 (AST: 100 frames = 1.0 s; Whisper: a 1 s window).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence

SAMPLE_RATE = 16000
KINDS = ("ast", "whisper", "wav2vec2", "hubert")


def _ast(out: Path) -> None:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    # 1 s at 16 kHz = 98 kaldi frames (25 ms window, 10 ms hop); max_length 100 pads 2 of them
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    patch_size=16, frequency_stride=10, time_stride=10, max_length=100, num_mel_bins=32,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ASTModel(cfg).save_pretrained(out)
    ASTFeatureExtractor(sampling_rate=SAMPLE_RATE, num_mel_bins=32, max_length=100, mean=-4.0, std=4.0,
                        do_normalize=True).save_pretrained(out)


def _whisper(out: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    # the encoder takes exactly 2 * max_source_positions = 100 mel frames = 1 s at a 160-sample hop,
    # the same window the extractor pads to with chunk_length=1 (real checkpoints: 3000 frames, 30 s)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=20, d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=50, max_target_positions=32,
                        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
                        suppress_tokens=[], begin_suppress_tokens=[], dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0)
    WhisperForConditionalGeneration(cfg).save_pretrained(out)  # a full seq2seq dir, as hub ones are
    WhisperFeatureExtractor(feature_size=20, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=1,
                            n_fft=400).save_pretrained(out)


def _ctc_like(out: Path, kind: str) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    conf_cls, model_cls = (Wav2Vec2Config, Wav2Vec2Model) if kind == "wav2vec2" else (HubertConfig, HubertModel)
    # conv feature encoder with total stride 320 (= 20 ms at 16 kHz), as the real ones
    cfg = conf_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   conv_dim=(32, 32, 32), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8),
                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32,
                   hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                   final_dropout=0.0)  # layerdrop / SpecAugment stay at the hub defaults: the tower turns them off
    model_cls(cfg).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(out)


def make_tiny_audio_dirs(out: Path, kinds: Sequence[str] = KINDS, seed: int = 0) -> Dict[str, Path]:
    """Write one directory per kind under `out` (out/<kind>); returns {kind: path}."""
    import torch

    from mmpretrain.export import share_readable

    makers = {"ast": _ast, "whisper": _whisper, "wav2vec2": lambda p: _ctc_like(p, "wav2vec2"),
              "hubert": lambda p: _ctc_like(p, "hubert")}
    out = Path(out)
    dirs = {}
    for i, kind in enumerate(kinds):
        if kind not in makers:
            raise ValueError(f"unknown tiny audio model {kind!r}; choose from {list(makers)}")
        torch.manual_seed(seed + i)
        d = out / kind
        d.mkdir(parents=True, exist_ok=True)
        makers[kind](d)
        share_readable(d)  # safetensors writes 0600
        dirs[kind] = d
    return dirs


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="parent directory; one sub-directory per model is written")
    # --only as in tools/make_tiny_hf.py; --kinds (comma-separated) is the older, hidden spelling
    p.add_argument("--only", nargs="+", choices=KINDS, default=None, help="kinds to write (default: all)")
    p.add_argument("--kinds", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    a = p.parse_args(argv)
    kinds = a.only or ([k for k in a.kinds.split(",") if k] if a.kinds else list(KINDS))
    for kind, path in make_tiny_audio_dirs(Path(a.out), kinds, a.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
