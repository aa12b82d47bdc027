"""Write tiny local HuggingFace (transformers) model directories, made from configs: nothing is
downloaded. Each directory is what `save_pretrained` writes (config.json, model.safetensors) plus
the files its tower needs: a tokenizer (text) or an image processor (image). They serve as
`model.<tower>.hf_path` in tests and in configs/hf_tiny.yaml.

    python tools/make_tiny_hf.py --out data/hf_tiny            # every kind
    python tools/make_tiny_hf.py --out data/hf_tiny --only bert vit

Text (tokenizers trained on the demo captions with `tokenizers`, saved as a fast tokenizer):
  bert          BertModel, WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]; "[CLS] text [SEP]"
  roberta       RobertaModel, byte-level BPE with <s> <pad> </s> <unk> <mask>; "<s> text </s>"
  clip_text     CLIPTextModel (causal), byte-level BPE, <|startoftext|> / <|endoftext|> (= pad)
  nopad_text    a BertModel whose tokenizer has no pad token (refusal tests)
Image (processor of the family, size = --image-size):
  vit           ViTModel + ViTImageProcessor (mean = std = 0.5)
  clip_vision   CLIPVisionModel + CLIPImageProcessor (CLIP statistics, resize + centre crop)
  dinov2        Dinov2Model + BitImageProcessor (ImageNet statistics)
  siglip_vision SiglipVisionModel + SiglipImageProcessor (attention-pooling head)
Audio (tools/make_tiny_hf_audio.py makes them; 16 kHz feature extractors, clips up to 1 s):
  ast           ASTModel + ASTFeatureExtractor (kaldi log-mel, 32 bins, 100 frames)
  whisper       WhisperModel (its encoder is the tower) + WhisperFeatureExtractor (1 s window)
  wav2vec2      Wav2Vec2Model + Wav2Vec2FeatureExtractor (normalised waveform)
  hubert        HubertModel + Wav2Vec2FeatureExtractor

Every model is 2 layers of width 32 with dropout 0, so a test trains it in a fraction of a second.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TEXT_KINDS = ("bert", "roberta", "clip_text", "nopad_text")
IMAGE_KINDS = ("vit", "clip_vision", "dinov2", "siglip_vision")
AUDIO_KINDS = ("ast", "whisper", "wav2vec2", "hubert")  # tools/make_tiny_hf_audio.py
KINDS = TEXT_KINDS + IMAGE_KINDS + AUDIO_KINDS
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MAX_POSITIONS = 64  # text: longest input (data.text_max_len must not exceed it)


def corpus() -> List[str]:
    """Every demo caption (mmpretrain.data.demo) and a few generic sentences."""
    from mmpretrain.data import demo

    out = [t.format(colour=c, shape=s) for t in demo.CAPTION_TEMPLATES for s in demo.SHAPES for c in demo.COLOURS]
    out += [demo.audio_caption(s, c) for s in demo.SHAPES for c in demo.COLOURS]
    out += ["the quick brown fox jumps over the lazy dog", "a photo of a cat", "a sound of a dog barking"]
    return out


# ----------------------------------------------------------------------------- tokenizers


def _wordpiece(lines: Sequence[str], vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _bytelevel_bpe(lines: Sequence[str], specials: List[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


def _save_tokenizer(tok, out: Path, max_len: int, **special: Optional[str]) -> int:
    """Save as a fast tokenizer directory (AutoTokenizer reads it); returns its length."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len,
                                   **{k: v for k, v in special.items() if v is not None})
    fast.save_pretrained(str(out))
    return len(fast)


# ----------------------------------------------------------------------------- makers


def make_bert(out: Path, image_size: int, pad: bool = True) -> None:
    from transformers import AutoModel, BertConfig

    n = _save_tokenizer(_wordpiece(corpus()), out, MAX_POSITIONS, pad_token="[PAD]" if pad else None,
                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=n, max_position_embeddings=MAX_POSITIONS, **SMALL, **NO_DROPOUT)
    AutoModel.from_config(cfg).save_pretrained(str(out))


def make_roberta(out: Path, image_size: int) -> None:
    from tokenizers import processors
    from transformers import AutoModel, RobertaConfig

    tok = _bytelevel_bpe(corpus(), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    n = _save_tokenizer(tok, out, MAX_POSITIONS, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    # RoBERTa positions start after the pad id: two more position embeddings than tokens
    cfg = RobertaConfig(vocab_size=n, max_position_embeddings=MAX_POSITIONS + 2, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, type_vocab_size=1, **SMALL, **NO_DROPOUT)
    AutoModel.from_config(cfg).save_pretrained(str(out))


def make_clip_text(out: Path, image_size: int) -> None:
    from tokenizers import processors
    from transformers import AutoModel, CLIPTextConfig

    tok = _bytelevel_bpe(corpus(), ["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    # as OpenAI's CLIP tokenizer: pad is the end-of-text token
    n = _save_tokenizer(tok, out, MAX_POSITIONS, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=n, max_position_embeddings=MAX_POSITIONS, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, projection_dim=32, **SMALL)
    AutoModel.from_config(cfg).save_pretrained(str(out))


def make_nopad_text(out: Path, image_size: int) -> None:
    make_bert(out, image_size, pad=False)


def make_vit(out: Path, image_size: int) -> None:
    from transformers import AutoModel, ViTConfig, ViTImageProcessor

    cfg = ViTConfig(image_size=image_size, patch_size=8, **SMALL, **NO_DROPOUT)
    AutoModel.from_config(cfg, add_pooling_layer=False).save_pretrained(str(out))
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))


def make_clip_vision(out: Path, image_size: int) -> None:
    from transformers import AutoModel, CLIPImageProcessor, CLIPVisionConfig

    cfg = CLIPVisionConfig(image_size=image_size, patch_size=8, projection_dim=32, **SMALL)
    AutoModel.from_config(cfg).save_pretrained(str(out))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out))


def make_dinov2(out: Path, image_size: int) -> None:
    from transformers import AutoModel, BitImageProcessor, Dinov2Config

    cfg = Dinov2Config(image_size=image_size, patch_size=8, mlp_ratio=2, **{k: v for k, v in SMALL.items()
                                                                          if k != "intermediate_size"}, **NO_DROPOUT)
    AutoModel.from_config(cfg).save_pretrained(str(out))
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(out))


def make_siglip_vision(out: Path, image_size: int) -> None:
    from transformers import AutoModel, SiglipImageProcessor, SiglipVisionConfig

    cfg = SiglipVisionConfig(image_size=image_size, patch_size=8, **SMALL)
    AutoModel.from_config(cfg).save_pretrained(str(out))
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))


def _audio_maker(kind: str) -> Callable[[Path, int], None]:
    def make_audio(out: Path, image_size: int) -> None:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "make_tiny_hf_audio", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_tiny_hf_audio.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        tool.make_tiny_audio_dirs(out.parent, [kind])  # writes out.parent/<kind>/ = out

    return make_audio


MAKERS: Dict[str, Callable[[Path, int], None]] = {
    **{k: globals()[f"make_{k}"] for k in TEXT_KINDS + IMAGE_KINDS}, **{k: _audio_maker(k) for k in AUDIO_KINDS}}


def make(out: "str | Path", kinds: Sequence[str] = KINDS, image_size: int = 16) -> Dict[str, Path]:
    """Write `out/<kind>/` for each kind (skipped when its config.json exists); kind -> directory."""
    import torch

    from mmpretrain.models.hf import quiet

    out = Path(out)
    dirs = {}
    for kind in kinds:
        d = out / kind
        if not (d / "config.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)  # the same tiny weights every time
            with quiet():
                MAKERS[kind](d, image_size)
        dirs[kind] = d
    return dirs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="make_tiny_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory that receives one sub-directory per kind")
    p.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="kinds to write (default: all)")
    p.add_argument("--image-size", type=int, default=16, help="image towers' input size (= data.image_size)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for kind, d in make(args.out, args.only, args.image_size).items():
        print(f"{kind:14s} {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
