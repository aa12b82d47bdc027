"""Typed run configuration: one schema (dataclasses), YAML files, dotted overrides.

Every value is checked before any process group starts; errors name the key, the
value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmpretrain.plugins import PluginError, load_plugins

if TYPE_CHECKING:  # torch only for annotations: importing it costs seconds, and a refusal must not pay them
    import torch


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it."""


# ----------------------------------------------------------------------------- schema


@dataclass
class SourceConfig:
    """One shard source. Sources with different modality sets mix by weight."""

    name: str = "default"  # the source's name in metrics and logs (data/<name>/...); unique in data.train
    urls: str = MISSING  # brace-expanded list, local paths or `pipe:` commands
    weight: float = 1.0  # sampling weight: each sample of a batch comes from this source with p = weight / sum
    # extension list per modality; `json:caption` reads a field of a json member
    image_keys: str = "jpg;jpeg;png;webp"
    audio_keys: str = "flac;wav;mp3;ogg"  # audio member extensions
    text_keys: str = "txt;json:caption"  # caption members: extensions, or json:<field> of the .json member
    # modalities every sample must have (`;`-separated, e.g. "text"); others are skipped as missing_<m>
    required: str = ""
    # json shard-name -> sample count; default: sizes.json beside local shards (pipes need it)
    sizes: Optional[str] = None


@dataclass
class AudioDataConfig:
    sample_rate: int = 16000  # Hz; every clip is resampled to it
    # seconds per sample: longer clips are cropped (random window in training, centre in eval), shorter ones
    # filled (data.audio_augment.placement)
    clip_seconds: float = 1.0
    # an HF feature extractor directory (preprocessor_config.json) run on each decoded clip in the
    # loader workers; None = the waveform (native tower). Filled from model.audio.hf_path for kind=hf
    feature_extractor: Optional[str] = None


@dataclass
class AudioAugmentConfig:
    """Training-only waveform augmentation (mmpretrain.data.audio_augment); all off by default.
    Ranges are [low, high] lists drawn uniformly per sample from the sample's seeded rng."""

    placement: str = "repeat"  # clips shorter than the window: repeat (from the start) | random (random offset, zero pad)
    gain_db: List[float] = field(default_factory=lambda: [0.0, 0.0])  # random gain in dB; [0, 0] = off
    noise_prob: float = 0.0  # share of clips that get additive noise (0 = off)
    noise_snr_db: List[float] = field(default_factory=lambda: [10.0, 40.0])  # signal-to-noise ratio of that noise
    # noise clips (shard URLs; their audio members, read once per worker) instead of white noise; None = white
    noise_urls: Optional[str] = None
    speed: List[float] = field(default_factory=lambda: [1.0, 1.0])  # speed factor (tempo and pitch), [1, 1] = off
    mix_prob: float = 0.0  # share of clips mixed with the previous clip of the same batch (0 = off)
    mix_gain_db: List[float] = field(default_factory=lambda: [-12.0, -3.0])  # that clip's gain relative to this one


@dataclass
class ImageAugmentConfig:
    """Training-only image augmentation after the random resized crop (decode.decode_image); all off by default."""

    rotate_deg: float = 0.0  # random affine: rotation in [-d, d] degrees
    scale: List[float] = field(default_factory=lambda: [1.0, 1.0])  # affine zoom factor range
    shear_deg: float = 0.0  # horizontal shear in [-d, d] degrees
    translate: float = 0.0  # shift in [-t, t] x image side, each axis
    brightness: float = 0.0  # colour jitter: factor in [1 - b, 1 + b]
    contrast: float = 0.0  # colour jitter: contrast factor in [1 - c, 1 + c]
    saturation: float = 0.0  # colour jitter: saturation factor in [1 - s, 1 + s]
    blur_prob: float = 0.0  # Gaussian blur with radius (pixels) drawn from blur_radius
    blur_radius: List[float] = field(default_factory=lambda: [0.1, 1.5])  # [low, high] blur radius in pixels
    erase_prob: float = 0.0  # random erasing of a rectangle (area share from erase_area), filled with 0 = the mean
    erase_area: List[float] = field(default_factory=lambda: [0.02, 0.2])  # [low, high] share of the area erased


@dataclass
class DataConfig:
    train: List[SourceConfig] = field(default_factory=list)  # the training shard sources (keys below), mixed by weight
    eval_urls: Optional[str] = None  # eval shards for the periodic and final eval; None = no eval
    num_workers: int = 2  # data-loader worker processes per rank
    image_size: int = 64  # side in pixels of the square images the vision tower sees
    audio: AudioDataConfig = field(default_factory=AudioDataConfig)  # how audio members are decoded
    # tokens per caption, BOS and EOS included; longer captions are cut at the end, counted per source
    # (metrics data/truncated) and warned about when more than 20 % are. The byte tokenizer spends one
    # token per byte: a ~100-character caption needs ~100 (a BPE tokenizer fits it in ~25)
    text_max_len: int = 128
    tokenizer: str = "bytes"  # "bytes", a tokenizer.json file, or a local HF tokenizer dir
    shuffle_buffer: int = 256  # samples per shuffle window of each source's stream (larger: better mixed, more memory)
    shard_shuffle: bool = True  # seeded shuffle of the shard order each epoch
    resampled: bool = False  # infinite seeded sampling of shards instead of epochs
    max_error_rate: float = 0.1  # stop when more than this share of samples is corrupt
    min_samples_for_error_rate: int = 100  # data.max_error_rate applies only after this many samples
    # training-time randomness: random resized crop, audio crop, caption choice, and the augment sections below
    train_augment: bool = True
    crop_min_scale: float = 0.9  # random resized crop: smallest area share kept
    # a json caption field holding a list: training draws one option per sample and epoch; false: always
    # the first, as eval does (the ablation's text-variation switch)
    caption_sampling: bool = True
    # off by default, as in OpenCLIP: a mirror image contradicts captions that say left / right and
    # mirrors digits and written text; turn it on for data where orientation carries no meaning
    hflip: bool = False
    max_image_pixels: int = 50_000_000  # larger images (decompression bombs) are skipped unread
    # image normalisation per RGB channel; None = CLIP's statistics, or the image processor's
    # (preprocessor_config.json) for model.vision.kind=hf, filled in before training starts
    image_mean: Optional[List[float]] = None
    image_std: Optional[List[float]] = None  # the std per channel to that mean; None = from the same source
    audio_augment: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)  # with train_augment only
    image_augment: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)  # with train_augment only


@dataclass
class TowerBase:
    """What every tower section has: its kind, its shape, and how it is initialised and frozen
    (every kind; mmpretrain.models.freeze, mmpretrain.models.hf)."""

    kind: str = "native"  # the tower builder registered for this modality (mmpretrain.modalities)
    # false: no tower, its pairs are off, its members are not decoded (also automatic when no pair of
    # weight > 0 and no captioning uses the modality: modalities.active)
    enabled: bool = True
    width: int = 128  # hidden size of the native tower's layers
    depth: int = 2  # transformer layers of the native tower
    heads: int = 4  # attention heads (width must be divisible by heads)
    mlp_ratio: float = 4.0  # MLP hidden size = width x mlp_ratio
    hf_path: Optional[str] = None  # kind=hf: a local transformers model directory (never downloaded)
    init: str = "auto"  # auto (hf weights for kind=hf, random otherwise) | random | hf | path to our export/checkpoint
    pooling: str = "auto"  # kind=hf: text cls|mean|eos, image cls|mean; auto = what the model family does
    lock: bool = False  # freeze the tower: no gradients, no optimizer state, forward without autograd
    unlock_last_n_layers: int = 0  # with lock: the last n encoder layers (and the final norm) still train
    unlock_layernorm: bool = False  # with lock: LayerNorm weights still train (LayerNorm-only tuning)
    lr_mult: float = 1.0  # this tower's learning rate = optim.lr x lr_mult (projections keep optim.lr)
    # recompute each layer's activations in backward instead of keeping them (memory for compute;
    # text: the caption decoder and its causal module too)
    grad_checkpointing: bool = False
    # native towers: this tower's dropout (attention weights); None = model.dropout
    dropout: Optional[float] = None
    # native towers: stochastic depth, per-sample residual-branch drop rising linearly with depth to this rate
    drop_path: float = 0.0


@dataclass
class TowerConfig(TowerBase):
    patch_size: int = 8  # vision: pixels; audio: mel bins x frames
    stem: str = "patch"  # vision: patch (one linear patchify) | conv (3x3 stride-2 convs; patch_size a power of 2)


@dataclass
class SpecAugmentConfig:
    """SpecAugment on the log-mel, training mode only (models/audio.py); 0 masks = off."""

    time_masks: int = 0  # masks per clip along time, each up to time_width frames
    time_width: int = 0  # longest time mask, frames
    freq_masks: int = 0  # masks per clip along mel bins, each up to freq_width bins
    freq_width: int = 0  # widest frequency mask, mel bins


@dataclass
class AudioTowerConfig(TowerConfig):
    n_mels: int = 64  # log-mel bins (a multiple of patch_size)
    n_fft: int = 400  # STFT window in samples (400 = 25 ms at 16 kHz)
    hop_length: int = 160  # STFT hop in samples, one mel frame each (160 = 10 ms at 16 kHz)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)  # native tower only
    # vocal-tract-length perturbation (Jaitly & Hinton 2013), training only, native tower: each clip's
    # spectrum is stretched along frequency by a factor drawn from [low, high] (formants move, pitch
    # and tempo stay: speaker variation speed perturbation cannot give alone); [1, 1] = off
    freq_warp: List[float] = field(default_factory=lambda: [1.0, 1.0])
    # log-mel normalisation per clip: utterance (one mean / std over the whole clip) | per_bin (each mel
    # bin's mean over time removed first: cepstral mean normalisation, the voice's and channel's
    # long-term spectral shape taken out), native tower
    mel_norm: str = "utterance"
    patch_size: int = 8


@dataclass
class TextTowerConfig(TowerBase):
    """depth: the unimodal causal layers (the contrastive text embedding). With kind=hf, width /
    depth / heads / mlp_ratio shape the small causal text module the caption decoder reads (an HF
    encoder sees future tokens, so its states cannot feed a captioner)."""

    decoder_depth: int = 0  # multimodal decoder layers (captioning); 0 = off
    decoder_queries: int = 16  # attentional-pooler queries per modality; 0 = attend to every token


@dataclass
class ModelConfig:
    embed_dim: int = 128  # the shared contrastive embedding size every tower projects to
    vision: TowerConfig = field(default_factory=TowerConfig)
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    attention_backend: str = "auto"  # attention kernel of the native towers: auto | sdpa | triton | flash | reference
    dropout: float = 0.0  # native towers' dropout unless model.<tower>.dropout sets their own


@dataclass
class LossConfig:
    kind: str = "infonce"  # contrastive loss: infonce (softmax over the batch, CLIP) | siglip (pairwise sigmoid)
    impl: str = "naive"  # infonce logits: naive (the whole similarity matrix) | tiled (in tiles: Triton on CUDA)
    # weight per contrastive pair (`image_text`, ...: mmpretrain.modalities.pairs()); unlisted pairs weigh 1
    pairs: Dict[str, float] = field(default_factory=dict)
    init_temperature: float = 0.07  # starting temperature of the learned logit scale (scale = 1 / temperature)
    max_logit_scale: float = 100.0  # the learned logit scale is clamped at this
    # a pair's loss counts in a step only when the global batch holds this many samples with both modalities
    min_valid_pairs: int = 2
    contrastive_weight: float = 1.0  # weight of the contrastive losses in the total loss
    caption_weight: float = 2.0  # weight of the captioning loss (needs model.text.decoder_depth > 0)
    # exact big-batch contrastive gradients over train.grad_accum micro-batches (no-grad feature pass first)
    feature_cache: bool = False
    # other samples of a row's class (json `label` / .cls, equal and >= 0) in the batch: negative (CLIP) |
    # ignore (left out of the softmax: no false negatives) | positive (UniCL: all pulled together); infonce, naive
    same_label: str = "negative"


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup_steps
    weight_decay: float = 0.1  # AdamW weight decay of matrices (biases, norms and embedding tables: none)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.98  # AdamW second-moment decay
    eps: float = 1e-6  # AdamW denominator epsilon
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay after warm-up ends at lr x min_lr_ratio at the last step


@dataclass
class EmaConfig:
    """Exponential moving average of the trainable weights (mmpretrain.ema), fp32, on the device."""

    enabled: bool = False  # keep the EMA (saved with each checkpoint as ema.pt)
    decay: float = 0.999  # ema = decay x ema + (1 - decay) x weights, after each optimizer step
    # decay_t = min(decay, (1 + n) / (10 + n)) after n updates: early weights (random init) fade fast
    warmup: bool = True
    every: int = 1  # update every this many optimizer steps (skipped non-finite steps never update)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps of the run
    micro_batch_size: int = 16  # samples per rank in each forward / backward
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = micro batch x grad_accum x ranks)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    zero_stage: int = 2  # DeepSpeed ZeRO: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters partitioned
    # torch.compile of each tower: off | inductor | aot_eager | eager (models/compile.py); ZeRO 0-2
    compile: str = "off"
    # glibc keeps freed host memory (no mmap for large blocks, no trimming): a CPU step no longer
    # page-faults its activations in again every step (mmpretrain.host_malloc; 12-40 % faster on CPU)
    keep_host_memory: bool = True
    # the device's peak TFLOP/s at the run's precision, for the logged MFU (0 = no MFU; a table of
    # dense bf16 peaks: mmpretrain.throughput, README)
    peak_tflops: float = 0.0
    # merged into the generated DeepSpeed config (engine.PASSTHROUGH: offload, overlap_comm, bucket
    # sizes, stage-3 knobs, ...); what other keys set (batch sizes, precision, stage, clipping) is refused
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    # stage 3: build the model under deepspeed.zero.Init (each module partitioned as it is built,
    # HF towers loaded shard-wise), so no rank ever holds the whole model; false = build whole, then partition
    zero3_init: bool = True
    precision: str = "fp32"  # training precision: fp32 | bf16 | fp16
    log_every: int = 10  # log training metrics every this many steps
    eval_every: int = 0  # eval on data.eval_urls every this many steps; 0 = only at the end
    save_every: int = 0  # save a checkpoint every this many steps; 0 = only at the end
    save_every_minutes: float = 0.0  # also save when this many minutes passed since the last save (0 = off)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    async_save: bool = False  # periodic saves: snapshot in memory, write in a background thread while training goes on
    resume: str = "auto"  # auto (the run directory's latest checkpoint, if any) | never | a checkpoint path
    max_nonfinite_steps: int = 5  # stop after this many non-finite (NaN / inf) steps in a row; each is skipped
    # with SLURM_JOB_END_TIME set, save and exit for requeue this long before the limit (0 = off)
    preempt_margin_minutes: float = 0.0
    # a collective waiting longer than this for a peer fails; the survivors exit with 76
    # (mmpretrain.lifecycle.PEER_LOST_EXIT_CODE) naming the lost rank
    dist_timeout_minutes: float = 5.0
    # no completed step (or eval / save) in this long: every rank dumps its stacks to
    # logs/hang_rank{r}.txt and exits with 79 (HANG_EXIT_CODE); 0 = off
    hang_timeout_minutes: float = 0.0
    ema: EmaConfig = field(default_factory=EmaConfig)
    # wall-clock budget of the loop (0 = off): the step time measured after warm-up shortens train.steps
    # and the LR schedule to what fits (mmpretrain.budget); the decision is kept across resumes
    max_minutes: float = 0.0


@dataclass
class WandbConfig:
    # offline / online turn wandb on; with wandb listed in log.report_to, disabled means online;
    # WANDB_MODE in the environment wins (mmpretrain.report_backends)
    mode: str = "disabled"  # disabled | offline | online
    project: str = "mmpretrain"  # wandb project
    entity: Optional[str] = None  # wandb entity (team or user); None = the account's default


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # extra metric destinations: any of jsonl (always written), tensorboard, wandb (mmpretrain.report_backends)
    report_to: List[str] = field(default_factory=list)
    # rank 0's console at each logged step: auto (a bar on a terminal, lines on a file / pipe) | bar | lines | off
    # (the per-rank log files always get the lines; true / false of older configs mean auto / off)
    progress: str = "auto"


@dataclass
class RunConfig:
    name: str = "run"  # the run's name: wandb run name, default SLURM job name
    output_dir: str = "runs/default"  # checkpoints, logs, metrics.jsonl and the saved config.yaml go here
    seed: int = 0  # seeds the initial weights, the data order and augmentation
    # modules imported (`module`) or functions called (`module:function`) before anything is built:
    # extra modalities, tower kinds, test hooks (mmpretrain.plugins)
    plugins: List[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    """Caption decoding (mmpretrain.generation): greedy / beam / sampling."""

    max_new_tokens: int = 64  # capped by data.text_max_len - 1
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens
    num_beams: int = 1  # beam search width; 1 = greedy (or sampling)
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    do_sample: bool = False  # sample instead of greedy / beam search
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style, on tokens generated so far)
    seed: int = 0  # seed of the sampling generator


@dataclass
class EvalConfig:
    """What the periodic eval (and `python -m mmpretrain.evaluate`) computes besides retrieval."""

    zeroshot: bool = True  # needs json labels and class names
    class_names: Optional[str] = None  # json list file; default: classes.json beside/above the eval shards
    templates: List[str] = field(default_factory=lambda: ["{}"])  # prompt templates, `{}` = class name
    captioning: bool = True  # when the model has a decoder
    caption_samples: int = 128  # per modality; 0 = all eval samples
    caption_attributes: Optional[str] = None  # "demo": also score attribute words of the demo data
    linear_probe: bool = False  # periodic eval only; the evaluate CLI runs it by default
    # json field naming an item's group: without train shards the probe splits the eval items by it,
    # a whole group on one side, so repeated items never land on both sides
    probe_group_key: str = "group"
    probe_train_max: int = 4096  # most samples the probe trains on from the train shards (spread over sources)
    use_ema: bool = False  # the periodic and final eval of a run score the EMA weights (train.ema.enabled)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- checks

# train.precision / export --dtype name -> the name of its torch dtype (names, not dtypes: this
# module must not import torch, so that a refused config costs a fraction of a second)
DTYPES: Dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_of(name: str) -> "torch.dtype":
    """The torch dtype of a precision name in DTYPES; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not one of {sorted(DTYPES)}")
    import torch  # lazy: config checks run (and refuse) without torch; only the trainer / export need dtypes

    return getattr(torch, DTYPES[name])


_CHOICES = {
    "loss.kind": ("infonce", "siglip"),
    "loss.impl": ("naive", "tiled"),
    "loss.same_label": ("negative", "ignore", "positive"),
    "model.audio.mel_norm": ("utterance", "per_bin"),
    "train.precision": tuple(DTYPES),
    "train.zero_stage": (0, 1, 2, 3),
    "train.compile": ("off", "inductor", "aot_eager", "eager"),
    "log.wandb.mode": ("disabled", "offline", "online"),
    "log.progress": ("auto", "bar", "lines", "off"),  # mmpretrain.console.PROGRESS_MODES
    "model.vision.stem": ("patch", "conv"),
    "data.audio_augment.placement": ("repeat", "random"),
    "model.attention_backend": ("auto", "sdpa", "triton", "flash", "reference"),
    "eval.caption_attributes": (None, "demo"),
}
# key -> (low, high, low inclusive?) ; None means unbounded on that side
_RANGES = {
    "data.num_workers": (0, 64, True),
    "data.image_size": (8, 4096, True),
    "data.audio.sample_rate": (1000, 192000, True),
    "data.audio.clip_seconds": (0.0, 600.0, False),
    "data.text_max_len": (4, 4096, True),
    "data.shuffle_buffer": (0, None, True),
    "data.max_error_rate": (0.0, 1.0, True),
    "data.min_samples_for_error_rate": (0, None, True),
    "data.crop_min_scale": (0.0, 1.0, False),
    "data.max_image_pixels": (1, None, True),
    "data.audio_augment.noise_prob": (0.0, 1.0, True),
    "data.audio_augment.mix_prob": (0.0, 1.0, True),
    "data.image_augment.rotate_deg": (0.0, 180.0, True),
    "data.image_augment.shear_deg": (0.0, 45.0, True),
    "data.image_augment.translate": (0.0, 0.5, True),
    "data.image_augment.brightness": (0.0, 1.0, True),
    "data.image_augment.contrast": (0.0, 1.0, True),
    "data.image_augment.saturation": (0.0, 1.0, True),
    "data.image_augment.blur_prob": (0.0, 1.0, True),
    "data.image_augment.erase_prob": (0.0, 1.0, True),
    "model.audio.spec_augment.time_masks": (0, 100, True),
    "model.audio.spec_augment.time_width": (0, None, True),
    "model.audio.spec_augment.freq_masks": (0, 100, True),
    "model.audio.spec_augment.freq_width": (0, None, True),
    "model.embed_dim": (1, None, True),
    "model.dropout": (0.0, 1.0, True),
    "loss.init_temperature": (0.0, 10.0, False),
    "loss.max_logit_scale": (1.0, None, True),
    "loss.min_valid_pairs": (1, None, True),
    "loss.contrastive_weight": (0.0, None, True),
    "loss.caption_weight": (0.0, None, True),
    "optim.lr": (0.0, 10.0, False),
    "optim.weight_decay": (0.0, None, True),
    "optim.beta1": (0.0, 1.0, True),
    "optim.beta2": (0.0, 1.0, True),
    "optim.warmup_steps": (0, None, True),
    "optim.min_lr_ratio": (0.0, 1.0, True),
    "train.steps": (1, None, True),
    "train.micro_batch_size": (1, None, True),
    "train.grad_accum": (1, None, True),
    "train.peak_tflops": (0.0, None, True),
    "train.grad_clip": (0.0, None, True),
    "train.log_every": (1, None, True),
    "train.eval_every": (0, None, True),
    "train.save_every": (0, None, True),
    "train.keep_last": (1, None, True),
    "train.max_nonfinite_steps": (1, None, True),
    "model.text.decoder_queries": (0, 4096, True),
    "eval.caption_samples": (0, None, True),
    "eval.probe_train_max": (1, None, True),
    "eval.generation.max_new_tokens": (1, 4096, True),
    "eval.generation.min_new_tokens": (0, 4096, True),
    "eval.generation.num_beams": (1, 256, True),
    "eval.generation.length_penalty": (-10.0, 10.0, True),
    "eval.generation.temperature": (0.0, 100.0, False),
    "eval.generation.top_k": (0, None, True),
    "eval.generation.top_p": (0.0, 1.0, False),
    "eval.generation.repetition_penalty": (0.0, 100.0, False),
    "train.preempt_margin_minutes": (0.0, None, True),
    "train.dist_timeout_minutes": (0.0, 1440.0, False),
    "train.hang_timeout_minutes": (0.0, None, True),
    "train.save_every_minutes": (0.0, None, True),
    "train.max_minutes": (0.0, None, True),
    "train.ema.decay": (0.0, 1.0, True),
    "train.ema.every": (1, None, True),
}

# [low, high] list keys -> (smallest low, largest high): two numbers, low <= high, inside these bounds
_PAIR_RANGES = {
    "data.audio_augment.gain_db": (-60.0, 60.0),
    "data.audio_augment.noise_snr_db": (-20.0, 100.0),
    "data.audio_augment.speed": (0.5, 2.0),
    "data.audio_augment.mix_gain_db": (-60.0, 0.0),
    "model.audio.freq_warp": (0.5, 2.0),
    "data.image_augment.scale": (0.25, 4.0),
    "data.image_augment.blur_radius": (0.0, 20.0),
    "data.image_augment.erase_area": (0.0, 1.0),
}


REPORT_TO = ("jsonl", "tensorboard", "wandb")  # log.report_to names (mmpretrain.report_backends)


def _check_report_to(cfg: Config) -> None:
    for name in cfg.log.report_to:
        if name not in REPORT_TO:
            raise ConfigError(f"config key 'log.report_to' = {list(cfg.log.report_to)} names unknown backend "
                              f"{name!r}; choose from {list(REPORT_TO)}")


def _check_pairs(cfg: Config) -> None:
    for key, (lo, hi) in _PAIR_RANGES.items():
        v = list(_get(cfg, key))
        if len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
            raise ConfigError(f"config key '{key}' = {v} must be [low, high] with {lo} <= low <= high <= {hi}")
    if cfg.model.audio.kind != "native" and any(dataclasses.asdict(cfg.model.audio.spec_augment).values()):
        raise ConfigError(f"config key 'model.audio.spec_augment' applies to the native audio tower only "
                          f"('model.audio.kind' = {cfg.model.audio.kind!r})")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _get_dotted(cfg: Config, dotted: str) -> Any:
    """Like _get, but through list indices and dict keys too ('data.train[0].weight', 'loss.pairs.x')."""
    obj: Any = cfg
    for part in dotted.replace("[", ".[").split("."):
        if part.startswith("["):
            obj = obj[int(part[1:-1])]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def _range_text(key: str) -> str:
    lo, hi, lo_incl = _RANGES[key]
    return f"{'[' if lo_incl else '('}{'-inf' if lo is None else lo}, {'inf)' if hi is None else f'{hi}]'}"


def _non_finite(obj: Any, prefix: str = "") -> Optional[str]:
    """The dotted key of the first float in the config that is NaN or infinite (no key means
    either: a NaN passes every `<` / `>` range test, an inf breaks the optimizer or the loss)."""
    if dataclasses.is_dataclass(obj):
        items: Any = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return prefix if isinstance(obj, float) and not math.isfinite(obj) else None
    for name, value in items:
        sub = f"{prefix}{name}" if name.startswith("[") or not prefix else f"{prefix}.{name}"
        found = _non_finite(value, sub)
        if found:
            return found
    return None


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad key; checks ranges, choices and shapes."""
    bad_float = _non_finite(cfg)
    if bad_float:
        allowed = f"; allowed {_range_text(bad_float)}" if bad_float in _RANGES else ""
        raise ConfigError(f"config key '{bad_float}' = {_get_dotted(cfg, bad_float)!r} is not a finite number{allowed}")
    if str(cfg.log.progress).lower() in ("true", "false"):  # a bool before it had modes: true = auto, false = off
        cfg.log.progress = "auto" if str(cfg.log.progress).lower() == "true" else "off"
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed and "off" in allowed and str(value).lower() == "false":
            # YAML 1.1 reads a bare `off` (train.compile=off) as false, stored as 'False' in a str field
            section, _, attr = key.rpartition(".")
            setattr(_get(cfg, section) if section else cfg, attr, "off")
            continue
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {list(allowed)}")
    for key, (lo, hi, lo_incl) in _RANGES.items():
        value = _get(cfg, key)
        # written so that NaN fails (every comparison with NaN is False); the walk above refuses it first
        ok = (lo is None or (value >= lo if lo_incl else value > lo)) and (hi is None or value <= hi)
        if not ok:
            raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed {_range_text(key)}")
    for section in ("vision", "audio", "text"):  # the schema's tower sections
        t = getattr(cfg.model, section)
        _check_heads(f"model.{section}", t.width, t.heads, t.depth)
        _check_tower_init(f"model.{section}", t)
    _check_text_tokenizer(cfg)
    _check_pairs(cfg)
    _check_report_to(cfg)
    for key in ("data.image_mean", "data.image_std"):
        v = _get(cfg, key)
        if v is not None and (len(v) != 3 or (key.endswith("std") and min(v) <= 0)):
            raise ConfigError(f"config key '{key}' = {list(v)} must be 3 numbers (R, G, B){', each > 0' if key.endswith('std') else ''}")
    native_vit = cfg.model.vision.kind != "hf"  # the patch checks are the native ViT's
    if native_vit and cfg.data.image_size % cfg.model.vision.patch_size:
        raise ConfigError(
            f"config key 'data.image_size' = {cfg.data.image_size} must be a multiple of "
            f"'model.vision.patch_size' = {cfg.model.vision.patch_size}"
        )
    ps = cfg.model.vision.patch_size
    if native_vit and cfg.model.vision.stem == "conv" and (ps < 2 or ps & (ps - 1)):
        raise ConfigError(f"config key 'model.vision.patch_size' = {ps} must be a power of 2 >= 2 with model.vision.stem=conv")
    if cfg.model.audio.n_mels % cfg.model.audio.patch_size:
        raise ConfigError(
            f"config key 'model.audio.n_mels' = {cfg.model.audio.n_mels} must be a multiple of "
            f"'model.audio.patch_size' = {cfg.model.audio.patch_size}"
        )
    frames = int(cfg.data.audio.sample_rate * cfg.data.audio.clip_seconds) // cfg.model.audio.hop_length + 1
    if frames < cfg.model.audio.patch_size:
        raise ConfigError(
            f"config key 'data.audio.clip_seconds' = {cfg.data.audio.clip_seconds} gives {frames} mel frames, "
            f"fewer than 'model.audio.patch_size' = {cfg.model.audio.patch_size}"
        )
    names = set()
    for i, src in enumerate(cfg.data.train):
        if src.weight <= 0:
            raise ConfigError(f"config key 'data.train[{i}].weight' = {src.weight} must be > 0")
        if not src.urls:
            raise ConfigError(f"config key 'data.train[{i}].urls' is empty")
        if src.name in names:
            raise ConfigError(f"config key 'data.train[{i}].name' = {src.name!r} is used by two sources")
        names.add(src.name)
    # late import: the registry imports the tower modules, which import this schema
    from mmpretrain import modalities

    problem = modalities.validate_config(cfg)
    if problem:
        raise ConfigError(problem)
    for pair, w in cfg.loss.pairs.items():
        if w < 0:
            raise ConfigError(f"config key 'loss.pairs.{pair}' = {w} must be >= 0")
    _check_ema(cfg)
    if cfg.train.compile != "off" and cfg.train.zero_stage == 3:
        raise ConfigError(f"config key 'train.compile' = {cfg.train.compile!r} with train.zero_stage=3: ZeRO-3 gathers "
                          "a tower's parameters in hooks around its forward, which a compiled tower does not run "
                          "the same way; compile with stages 0-2")
    if cfg.loss.same_label != "negative":
        clash = [f"{k}={v!r}" for k, v, bad in (("loss.kind", cfg.loss.kind, cfg.loss.kind != "infonce"),
                                                 ("loss.impl", cfg.loss.impl, cfg.loss.impl != "naive"),
                                                 ("loss.feature_cache", cfg.loss.feature_cache, cfg.loss.feature_cache))
                 if bad]
        if clash:
            raise ConfigError(f"config key 'loss.same_label' = {cfg.loss.same_label!r} works with loss.kind=infonce, "
                              f"loss.impl=naive and no feature cache; got {', '.join(clash)}")
    contrastive_off = sum(modalities.pair_weights(cfg).values()) == 0
    if contrastive_off and cfg.loss.caption_weight == 0:
        raise ConfigError("config keys 'loss.pairs.*' and 'loss.caption_weight' are all 0: nothing to train")
    if cfg.model.text.decoder_depth < 0:
        raise ConfigError(f"config key 'model.text.decoder_depth' = {cfg.model.text.decoder_depth} must be >= 0")
    if cfg.loss.caption_weight > 0 and cfg.model.text.decoder_depth == 0 and contrastive_off:
        raise ConfigError("config key 'loss.caption_weight' > 0 needs 'model.text.decoder_depth' > 0 when 'loss.pairs.*' are all 0")
    if not cfg.eval.probe_group_key.strip():
        raise ConfigError(f"config key 'eval.probe_group_key' = {cfg.eval.probe_group_key!r} must name a json field")
    bad_t = [t for t in cfg.eval.templates if "{}" not in t]
    if bad_t:
        raise ConfigError(f"config key 'eval.templates' has entries without '{{}}' (the class name slot): {bad_t}")


def audio_frontend_path(data_cfg: Any) -> Optional[str]:
    """`data.audio.feature_extractor` (an HF audio tower's front end), or None (also on a config
    saved before the key existed)."""
    try:
        return data_cfg.audio.feature_extractor or None
    except AttributeError:
        return None


TOWER_INITS = ("auto", "random", "hf")  # any other value of model.<tower>.init is a path
POOLINGS = {"vision": ("auto", "cls", "mean"), "audio": ("auto", "cls", "mean"), "text": ("auto", "cls", "mean", "eos")}


def _check_tower_init(prefix: str, t: Any) -> None:
    """hf_path / init / pooling / lock keys of one tower section (no file system: preflight checks paths)."""
    section = prefix.split(".")[-1]
    if t.kind == "hf" and not t.hf_path:
        raise ConfigError(f"config key '{prefix}.hf_path' is required with '{prefix}.kind' = 'hf' "
                          "(a local transformers model directory)")
    if not t.init:
        raise ConfigError(f"config key '{prefix}.init' is empty; give one of {list(TOWER_INITS)} or a path")
    if t.init == "hf" and t.kind != "hf":
        raise ConfigError(f"config key '{prefix}.init' = 'hf' needs '{prefix}.kind' = 'hf' (it is {t.kind!r})")
    if t.pooling not in POOLINGS[section]:
        raise ConfigError(f"config key '{prefix}.pooling' = {t.pooling!r} is not allowed; choose one of "
                          f"{list(POOLINGS[section])}")
    if t.pooling != "auto" and t.kind != "hf":
        raise ConfigError(f"config key '{prefix}.pooling' = {t.pooling!r} applies to kind=hf towers only "
                          f"('{prefix}.kind' = {t.kind!r})")
    if t.unlock_last_n_layers < 0:
        raise ConfigError(f"config key '{prefix}.unlock_last_n_layers' = {t.unlock_last_n_layers} must be >= 0")
    if (t.unlock_last_n_layers or t.unlock_layernorm) and not t.lock:
        which = "unlock_last_n_layers" if t.unlock_last_n_layers else "unlock_layernorm"
        raise ConfigError(f"config key '{prefix}.{which}' has an effect only with '{prefix}.lock' = true")
    if not 0 <= t.lr_mult <= 1000:
        raise ConfigError(f"config key '{prefix}.lr_mult' = {t.lr_mult} is out of range; allowed [0, 1000]")
    if t.dropout is not None and not 0 <= t.dropout <= 1:
        raise ConfigError(f"config key '{prefix}.dropout' = {t.dropout} is out of range; allowed [0, 1] or null (model.dropout)")
    if not 0 <= t.drop_path < 1:
        raise ConfigError(f"config key '{prefix}.drop_path' = {t.drop_path} is out of range; allowed [0, 1)")
    if t.kind == "hf" and (t.dropout is not None or t.drop_path > 0):
        which = "dropout" if t.dropout is not None else "drop_path"
        raise ConfigError(f"config key '{prefix}.{which}' applies to native towers only ('{prefix}.kind' = 'hf' keeps "
                          "the dropout of its own config.json)")


def _check_ema(cfg: Config) -> None:
    """train.ema with ZeRO-3 (each rank holds a shard of every parameter: the EMA would need its own
    partitioning) and eval.use_ema without an EMA are refused."""
    if cfg.train.ema.enabled and cfg.train.zero_stage == 3:
        raise ConfigError("config key 'train.ema.enabled' = True with train.zero_stage=3 is not supported: ZeRO-3 "
                          "partitions the parameters the EMA copies; use train.zero_stage 0-2")
    if cfg.eval.use_ema and not cfg.train.ema.enabled:
        raise ConfigError("config key 'eval.use_ema' = True needs 'train.ema.enabled' = true (there is no EMA to evaluate)")


def _same_path(a: str, b: str) -> bool:
    import os

    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _check_text_tokenizer(cfg: Config) -> None:
    """With an HF text tower the tokenizer is the tower's: data.tokenizer 'bytes' (the default) or that path."""
    t = cfg.model.text
    if t.kind == "hf" and t.hf_path and cfg.data.tokenizer != "bytes" and not _same_path(cfg.data.tokenizer, t.hf_path):
        raise ConfigError(f"config key 'data.tokenizer' = {cfg.data.tokenizer!r} differs from 'model.text.hf_path' = "
                          f"{t.hf_path!r}: an HF text tower reads only its own tokenizer (leave data.tokenizer "
                          "at 'bytes' to mean the tower's)")


def _check_heads(prefix: str, width: int, heads: int, depth: int) -> None:
    if heads < 1 or width < 1 or depth < 0:
        raise ConfigError(f"config key '{prefix}' has width={width}, heads={heads}, depth={depth}; need width, heads >= 1")
    if width % heads:
        raise ConfigError(f"config key '{prefix}.width' = {width} is not divisible by '{prefix}.heads' = {heads}")


# ----------------------------------------------------------------------------- loading


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently: `optim:` twice trained with the second section's lr)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"key '{key}' appears twice in one mapping (lines {first.start_mark.line + 1} "
                                    f"and {key_node.start_mark.line + 1}); plain YAML would keep only the last")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _locate(base: Any, data: Any, prefix: str = "") -> Optional[str]:
    """The dotted key of `data` (a plain dict) whose merge into `base` fails: OmegaConf leaves
    `full_key` empty when a whole section has the wrong type (`optim: 3`)."""
    if not isinstance(data, dict):
        return None
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        nested: Any = v
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        try:
            OmegaConf.merge(base, OmegaConf.create(nested))
        except OmegaConfBaseException:
            return _locate(base, v, dotted + ".") or dotted
        except Exception:  # noqa: BLE001 - a value OmegaConf cannot even hold: this key
            return dotted
    return None


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:  # unknown key or wrong type
        key = getattr(e, "full_key", None)
        if not key:
            try:
                key = _locate(base, OmegaConf.to_container(other))
            except Exception:  # noqa: BLE001 - best effort: the message still says what failed
                key = None
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{origin}: config key '{key or '?'}' is invalid: {msg}{_allowed_keys(e)}") from None


def _allowed_keys(e: Exception) -> str:
    """'; allowed keys: [...]' for an unknown key, from the schema section it was looked up in."""
    obj_type = getattr(e, "object_type", None)
    if "not in" not in str(e) or not (isinstance(obj_type, type) and dataclasses.is_dataclass(obj_type)):
        return ""
    return f"; allowed keys in {obj_type.__name__}: {sorted(f.name for f in dataclasses.fields(obj_type))}"


def parse_overrides(overrides: Sequence[str]) -> List[str]:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like 'section.key=value'; got {bad}")
    return list(overrides)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file + dotted overrides -> validated Config. Raises ConfigError."""
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"config file '{path}': {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_one_line(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        merged = _merge(merged, OmegaConf.create(raw), f"config file '{path}'")
    return _finish(_merge_overrides(merged, overrides))


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with dotted overrides, parsed, merged and validated exactly as load_config does them
    (mmpretrain.evaluate's overrides on a saved config). Raises ConfigError."""
    if not overrides:
        return cfg
    base = _merge(OmegaConf.structured(Config), OmegaConf.create(to_dict(cfg)), "saved config")
    return _finish(_merge_overrides(base, overrides))


def _merge_overrides(merged: Any, overrides: Sequence[str]) -> Any:
    for o in parse_overrides(overrides):
        key, value = o.split("=", 1)
        try:
            dot = OmegaConf.from_dotlist([o])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{o}' cannot be parsed: {e}") from None
        merged = _merge(merged, dot, f"override '{key}={value}'")
    return merged


def _finish(merged: Any) -> Config:
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}' is missing or invalid: {str(e).splitlines()[0]}") from None
    _load_plugins(cfg)
    validate(cfg)
    return cfg


def _load_plugins(cfg: Config) -> None:
    """Plugins may register modalities whose names validation checks, so they load first."""
    try:
        load_plugins(cfg.run.plugins)
    except PluginError as e:
        raise ConfigError(f"config key 'run.plugins': {e}") from None


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(d: Dict[str, Any]) -> Config:
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(d), "saved config")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _load_plugins(cfg)
    validate(cfg)
    return cfg


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
