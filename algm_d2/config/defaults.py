"""Every config key, declared once with its default and a comment (detectron2's defaults.py habit).

``get_cfg()`` returns a fresh copy. ``add_algm_config(cfg)`` declares the MODEL.ALGM node (also part of get_cfg;
kept as its own function so a detectron2 bridge can add it to detectron2's own config).
"""
from __future__ import annotations

from typing import Optional

from .config import CfgNode as CN

# The values of TEST.PRECISION, DEEPSPEED.PRECISION and the benchmark tools' --precision (see precision_dtype).
PRECISIONS = ("fp32", "bf16", "fp16")


def add_algm_config(cfg: CN) -> None:
    """Declare MODEL.ALGM: where and how ALGM merges (names follow ``algm_d2.merge.ALGMConfig``)."""
    cfg.MODEL.ALGM = CN()
    # Master switch: False runs the plain model whatever the keys below say.
    cfg.MODEL.ALGM.ENABLED = False
    # 1-based layer of CLAP (local merging), after that block's attention; null switches CLAP off.
    cfg.MODEL.ALGM.LOCAL_LAYER = 1
    # 1-based layer of GBM (global merging); paper: 5 for 12-block ViTs, 7 for ViT-L; null switches GBM off.
    cfg.MODEL.ALGM.GLOBAL_LAYER = 5
    # CLAP window (rows, cols); windows cut by the grid border are left unmerged.
    cfg.MODEL.ALGM.WINDOW = (2, 2)
    # CLAP rule: a float τ (merge windows whose mean cosine >= τ), "batch_stats", "top:R", "fraction:F" or null.
    cfg.MODEL.ALGM.LOCAL_THRESHOLD = 0.88
    # GBM rule: "batch_stats" (the release: mean + std / layer of best-match scores), a float τ, "top:R",
    # "fraction:F" or null.
    cfg.MODEL.ALGM.GLOBAL_THRESHOLD = "batch_stats"
    # "min": every image merges the batch-minimum count (the release; use for training). "per_image": each
    # image merges all its groups above τ (inference; batches are padded).
    cfg.MODEL.ALGM.BATCH_POLICY = "min"
    # Proportional attention (ToMe): add log(size) to each merged key's logits in the encoder and Segmenter's mask
    # transformer (the decoders built for merged tokens always weigh them by size). Off in the release.
    cfg.MODEL.ALGM.PROP_ATTN = False
    # Optional JSON file written by tools/calibrate_thresholds.py; when set, its per-layer τ = μ + σ replaces the
    # float thresholds above (rules given as strings are kept).
    cfg.MODEL.ALGM.CALIBRATION_FILE = ""
    # Comparison and ablation modes (docs/ALGM.md, "Modes"; configs/ade20k/segmenter/ablations/).
    # The module at LOCAL_LAYER: "clap" (ALGM) or "gbm" (global merging there, LOCAL_THRESHOLD as its rule; Table 5b).
    cfg.MODEL.ALGM.LOCAL_METHOD = "clap"
    # ToMe baseline: merge this many tokens after the attention of every layer (bipartite soft matching, fixed r,
    # size-weighted); 0 = off. Needs LOCAL_LAYER and GLOBAL_LAYER null; set PROP_ATTN True as ToMe does.
    cfg.MODEL.ALGM.TOME_R = 0
    # 1-based layers where ToMe merges; empty = every layer.
    cfg.MODEL.ALGM.TOME_LAYERS = []
    # Value of a merged token: "average" (size-weighted mean) or "random" (one member, probability ∝ size; Table 6).
    cfg.MODEL.ALGM.MERGE_VALUE = "average"
    # False keeps every token and copies each group's value to all its members (no attention balancing; Table 6).
    cfg.MODEL.ALGM.REDUCE_TOKENS = True


def _model(cfg: CN) -> None:
    cfg.MODEL = CN()
    # Registered meta-architecture (algm_d2.modeling.META_ARCH_REGISTRY): "Segmenter", "SETR", "SegViT",
    # "Mask2Former", "MergedTokenMask2Former".
    cfg.MODEL.META_ARCHITECTURE = "Segmenter"
    # Path to weights loaded after building (a released checkpoint or one of ours); "" = none.
    cfg.MODEL.WEIGHTS = ""
    # Device to build the model on: "auto" (cuda when a GPU is visible, else cpu), "cpu" or "cuda"; train_net picks
    # the local GPU when launched on one.
    cfg.MODEL.DEVICE = "auto"
    # Per-channel mean and std of input pixels in RGB order, 0-255 scale (Segmenter "vit": 0.5/0.5 of 255).
    cfg.MODEL.PIXEL_MEAN = [127.5, 127.5, 127.5]
    cfg.MODEL.PIXEL_STD = [127.5, 127.5, 127.5]

    cfg.MODEL.BACKBONE = CN()
    # Registered backbone (algm_d2.modeling.BACKBONE_REGISTRY): "ALGMViT" (tokens + merge state) or "ViTAdapter"
    # (EVA's ViT-Adapter pyramid around it, settings in MODEL.VIT_ADAPTER).
    cfg.MODEL.BACKBONE.NAME = "ALGMViT"
    # Encoder family: "vit" (timm VisionTransformer, Segmenter's layout), "deit_distilled" (class + distillation
    # token), "eva01" (timm Eva, EVA-01 layout) or "eva02" (timm Eva with SwiGLU, sub-LN and RoPE). Built from the
    # sizes below, never downloaded.
    cfg.MODEL.BACKBONE.ARCH = "vit"
    # Input size the position embedding is laid out for (pixels); other sizes interpolate it.
    cfg.MODEL.BACKBONE.IMG_SIZE = 512
    cfg.MODEL.BACKBONE.PATCH_SIZE = 16
    cfg.MODEL.BACKBONE.EMBED_DIM = 384
    cfg.MODEL.BACKBONE.DEPTH = 12
    cfg.MODEL.BACKBONE.NUM_HEADS = 6
    cfg.MODEL.BACKBONE.MLP_RATIO = 4.0
    # LayerNorm eps of the blocks (Segmenter's ViT: 1e-5; timm's: 1e-6).
    cfg.MODEL.BACKBONE.NORM_EPS = 1e-5
    cfg.MODEL.BACKBONE.DROP_PATH_RATE = 0.1
    cfg.MODEL.BACKBONE.DROPOUT = 0.0
    # How the position embedding is resized for another grid: "bilinear" (Segmenter) or "bicubic" (timm).
    cfg.MODEL.BACKBONE.POS_EMBED_INTERP = "bilinear"
    # timm / EVA weight file (.pth or .safetensors) that initialises the ViT before training (classifier and MIM
    # heads dropped, position embedding and patch kernel resized by timm's filters); "" = none. MODEL.WEIGHTS, when
    # given, is loaded afterwards and wins.
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    # EVA-02: the patch grid (side) its RoPE frequencies were laid out for in pretraining (pt_hw_seq_len).
    cfg.MODEL.BACKBONE.ROPE_PRETRAIN_GRID = 16
    # Recompute block activations in the backward pass (saves memory).
    cfg.MODEL.BACKBONE.ACTIVATION_CHECKPOINTING = False
    # Inference on CUDA: replay each run of blocks between ALGM merges as a CUDA graph once its (bucketed) shape comes
    # back; small models are bound by the host's launches. Costs GPU memory per captured shape (at most 128 graphs).
    # Eval only (training runs eagerly; the CPU never captures); off under DeepSpeed ZeRO-3's partitioned parameters.
    cfg.MODEL.BACKBONE.CUDA_GRAPHS = True
    # Row buckets per doubling of a per-image batch's packed token total (a power of two): more pad fewer rows but
    # capture more graphs, each an eager warm-up pass plus a capture (16: 2.2% extra rows, 15 graphs for 63 random
    # batches).
    cfg.MODEL.BACKBONE.CUDA_GRAPH_BUCKETS = 16

    cfg.MODEL.SEM_SEG_HEAD = CN()
    # Registered head: "MaskTransformer" (Segmenter's), "LinearDecoder", "SETRUpHead", "SETRMLAHead" or "ATMHead".
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskTransformer"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    # Label value excluded from the loss and the metrics.
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    # Mask transformer: layers, width (0 = the encoder's), heads (0 = width // 64), dropout, drop path.
    cfg.MODEL.SEM_SEG_HEAD.NUM_LAYERS = 2
    cfg.MODEL.SEM_SEG_HEAD.HIDDEN_DIM = 0
    cfg.MODEL.SEM_SEG_HEAD.NUM_HEADS = 0
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    cfg.MODEL.SEM_SEG_HEAD.DROP_PATH_RATE = 0.0
    # Mask2Former pixel decoder (registered in PIXEL_DECODER_REGISTRY): "MSDeformAttnPixelDecoder".
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    # Pixel decoder width (input/lateral/output convs) and mask feature channels (EVA: 1024; d2 R50: 256).
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 1024
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 1024
    # Normalization of the pixel decoder's convs ("GN": GroupNorm(32)).
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    # Deformable encoder of the pixel decoder: layers, heads, points per level and head, FFN width.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.ENC_NUM_HEADS = 32
    cfg.MODEL.SEM_SEG_HEAD.ENC_NUM_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.ENC_DIM_FEEDFORWARD = 4096
    # Backbone feature levels the deformable encoder reads (the lowest-resolution ones; the rest go through the
    # FPN lateral convs); the mask features are at 1/COMMON_STRIDE of the input.
    cfg.MODEL.SEM_SEG_HEAD.NUM_TRANSFORMER_LEVELS = 3
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    # Multi-scale deformable attention implementation: "auto" (Triton on CUDA, PyTorch reference on CPU),
    # "reference" or "triton".
    cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL = "auto"
    _mask_former(cfg)
    _vit_adapter(cfg)
    _setr(cfg)
    _segvit(cfg)
    add_algm_config(cfg)


def _mask_former(cfg: CN) -> None:
    cfg.MODEL.MASK_FORMER = CN()
    # Registered transformer decoder (TRANSFORMER_DECODER_REGISTRY): "MultiScaleMaskedTransformerDecoder" (on the
    # pixel decoder's pyramid) or "MergedTokenMaskedTransformerDecoder" (plain ViT: cross-attends to merged tokens).
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # Query width, number of queries, attention heads, FFN width (EVA ADE20K: 1024, 200, 32, 4096).
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 1024
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 200
    cfg.MODEL.MASK_FORMER.NHEADS = 32
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 4096
    # detectron2's convention: DEC_LAYERS - 1 decoder layers plus the prediction from the queries alone (EVA: 9).
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 9
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    # Pre-norm decoder layers (Mask2Former and EVA: post-norm, False).
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # Loss on every intermediate prediction (deep supervision).
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # Criterion: weight of the "no object" class in the CE; loss (and matching cost) weights.
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    # Point sampling for the matcher and the mask losses: points per mask, oversampling, importance ratio.
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 12544
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Images are padded to a multiple of this before the backbone (ViT-Adapter: 32).
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32


def _vit_adapter(cfg: CN) -> None:
    cfg.MODEL.VIT_ADAPTER = CN()
    # ViT-Adapter (BEiTAdapter as in EVA's release) around the ALGM backbone, used when MODEL.BACKBONE.NAME is
    # "ViTAdapter": spatial-prior stem width, deformable heads/points, value ratio, ConvFFN ratio.
    cfg.MODEL.VIT_ADAPTER.CONV_INPLANE = 64
    cfg.MODEL.VIT_ADAPTER.DEFORM_NUM_HEADS = 16
    cfg.MODEL.VIT_ADAPTER.N_POINTS = 4
    cfg.MODEL.VIT_ADAPTER.DEFORM_RATIO = 0.5
    cfg.MODEL.VIT_ADAPTER.CFFN_RATIO = 0.25
    cfg.MODEL.VIT_ADAPTER.WITH_CFFN = True
    # Initial injector gate gamma (0: the adapter starts as the identity on the ViT).
    cfg.MODEL.VIT_ADAPTER.INIT_VALUES = 0.0
    # Blocks of each interaction, inclusive 0-based [first, last] (EVA-01 ViT-g: 4 × 10 blocks).
    cfg.MODEL.VIT_ADAPTER.INTERACTION_INDEXES = [[0, 9], [10, 19], [20, 29], [30, 39]]
    # The last interaction runs 2 extra extractors.
    cfg.MODEL.VIT_ADAPTER.EXTRA_EXTRACTOR = True
    # Add the ViT's per-interaction maps to the pyramid.
    cfg.MODEL.VIT_ADAPTER.ADD_VIT_FEATURE = True


def _setr(cfg: CN) -> None:
    cfg.MODEL.SETR = CN()
    # SETR (META_ARCHITECTURE "SETR"; SEM_SEG_HEAD.NAME "SETRUpHead" for naive/PUP, "SETRMLAHead" for MLA). Block
    # indices are 0-based (negative: from the end), as the release's in_index / mla_index.
    # Block the up head reads (the release: the last, 23 for ViT-L).
    cfg.MODEL.SETR.IN_INDEX = -1
    # Up head layout: NUM_CONV 2 with NUM_UPSAMPLE_LAYER 1 (naive; CONV3X3_CONV1X1 False: two 1x1 convs) or
    # NUM_CONV 4 with NUM_UPSAMPLE_LAYER 4 (PUP: four 3x3 conv + x2 stages).
    cfg.MODEL.SETR.NUM_CONV = 2
    cfg.MODEL.SETR.NUM_UPSAMPLE_LAYER = 1
    cfg.MODEL.SETR.CONV3X3_CONV1X1 = False
    # MLA: the four blocks its neck aggregates, the neck's width and the head's width per level.
    cfg.MODEL.SETR.MLA_INDEX = (5, 11, 17, 23)
    cfg.MODEL.SETR.MLA_CHANNELS = 256
    cfg.MODEL.SETR.MLAHEAD_CHANNELS = 128
    # Auxiliary heads of training (not run in inference): the block each reads (naive/PUP) or the neck level 0..3
    # (MLA); () = none. Their cross-entropies are weighted by AUX_LOSS_WEIGHT.
    cfg.MODEL.SETR.AUX_IN_INDEX = ()
    cfg.MODEL.SETR.AUX_LOSS_WEIGHT = 0.4
    # Up-type auxiliary heads (naive/PUP): 2 convs, upsampling 1 (naive) or 2 (PUP: x4 between the convs); first
    # conv 3x3 (True) or 1x1 (False).
    cfg.MODEL.SETR.AUX_NUM_UPSAMPLE_LAYER = 1
    cfg.MODEL.SETR.AUX_CONV3X3_CONV1X1 = False


def _segvit(cfg: CN) -> None:
    cfg.MODEL.SEGVIT = CN()
    # SegViT (META_ARCHITECTURE "SegViT", SEM_SEG_HEAD.NAME "ATMHead"): the blocks whose tokens the ATM decoder reads
    # (0-based; the release: 7, 15, 23 for ViT-L), decoded deepest first, one ATM decoder per block.
    cfg.MODEL.SEGVIT.OUT_INDICES = (7, 15, 23)
    # ATM decoder: width, heads, layers per decoder, dropout of its layers and attention.
    cfg.MODEL.SEGVIT.EMBED_DIM = 512
    cfg.MODEL.SEGVIT.NUM_HEADS = 16
    cfg.MODEL.SEGVIT.NUM_LAYERS = 3
    cfg.MODEL.SEGVIT.DROPOUT = 0.1
    # ATM loss (the release's ATMLoss): class CE (no-object weight), focal mask loss and dice loss weights, on the
    # output and on each earlier decoder's masks.
    cfg.MODEL.SEGVIT.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.SEGVIT.CLASS_WEIGHT = 1.0
    cfg.MODEL.SEGVIT.MASK_WEIGHT = 20.0
    cfg.MODEL.SEGVIT.DICE_WEIGHT = 1.0


def _input(cfg: CN) -> None:
    cfg.INPUT = CN()
    # Training resize (mmseg/Segmenter): draw r in RATIO_RANGE and fit the image, keeping its aspect ratio, inside
    # (long, short) = IMAGE_SCALE * r.
    cfg.INPUT.IMAGE_SCALE = (2048, 512)
    cfg.INPUT.RATIO_RANGE = (0.5, 2.0)
    # Training crop (height, width); smaller images are padded to it at the bottom/right (image 0, label ignore).
    cfg.INPUT.CROP_SIZE = (512, 512)
    # Redraw the crop (up to 10 times) while one class covers >= this fraction of its labelled pixels; 1.0 = off.
    cfg.INPUT.CAT_MAX_RATIO = 0.75
    # Probability of a horizontal flip in training.
    cfg.INPUT.FLIP_PROB = 0.5
    # mmseg's PhotoMetricDistortion (random brightness, contrast, saturation, hue) in training.
    cfg.INPUT.PHOTOMETRIC_DISTORTION = True
    # Test resize: short side to MIN_SIZE_TEST, long side at most MAX_SIZE_TEST, keeping the ratio (ADE20K's
    # (2048, 512) test scale); MIN_SIZE_TEST 0 = no resize, MAX_SIZE_TEST 0 = no limit.
    cfg.INPUT.MIN_SIZE_TEST = 512
    cfg.INPUT.MAX_SIZE_TEST = 2048
    # Then resize (bilinear, not pad) each side up to a multiple of this (mmseg's ResizeToMultiple; EVA: 32); 0 = off.
    cfg.INPUT.SIZE_DIVISIBILITY_TEST = 0


def _datasets(cfg: CN) -> None:
    cfg.DATASETS = CN()
    # Registered dataset names (algm_d2.data.DATASET_REGISTRY; builtins in datasets/README.md). TRAIN datasets are
    # concatenated (same classes required); each TEST dataset is evaluated on its own.
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    # Evaluate only the first N images of each TEST dataset (a quick look); 0 = all of them.
    cfg.DATASETS.TEST_MAX_IMAGES = 0
    # Folder datasets registered at start-up: NAMES[i] pairs IMAGE_DIRS[i]/<stem>IMAGE_EXT with
    # MASK_DIRS[i]/<stem>MASK_EXT (label values 0..K-1 or IGNORE_LABEL); CLASSES_FILE lists the K class names, one
    # per line. Use the names in DATASETS.TRAIN / TEST.
    cfg.DATASETS.CUSTOM = CN()
    cfg.DATASETS.CUSTOM.NAMES = ()
    cfg.DATASETS.CUSTOM.IMAGE_DIRS = ()
    cfg.DATASETS.CUSTOM.MASK_DIRS = ()
    cfg.DATASETS.CUSTOM.CLASSES_FILE = ""
    cfg.DATASETS.CUSTOM.IGNORE_LABEL = 255
    cfg.DATASETS.CUSTOM.IMAGE_EXT = ".jpg"
    cfg.DATASETS.CUSTOM.MASK_EXT = ".png"


def _dataloader(cfg: CN) -> None:
    cfg.DATALOADER = CN()
    # Loader worker processes per rank (0 = load in the main process).
    cfg.DATALOADER.NUM_WORKERS = 4
    # True: a sample that cannot be used (missing or corrupt file, label values out of range, image/label size
    # mismatch) is skipped with a warning and counted (loader.dataset.num_skipped) instead of stopping the run;
    # training replaces it with another sample, evaluation leaves it out.
    cfg.DATALOADER.SKIP_BAD_SAMPLES = False


def _solver(cfg: CN) -> None:
    cfg.SOLVER = CN()
    # Iterations (optimizer steps) of training; one step consumes IMS_PER_BATCH images over all ranks.
    cfg.SOLVER.MAX_ITER = 160000
    # Global batch: images per optimizer step over all ranks and accumulation steps.
    cfg.SOLVER.IMS_PER_BATCH = 8
    # Micro-batches accumulated per step (per-rank micro-batch = IMS_PER_BATCH / world size / GRAD_ACCUM_STEPS).
    cfg.SOLVER.GRAD_ACCUM_STEPS = 1
    # "SGD" or "AdamW" (torch optimizers handed to DeepSpeed). The Segmenter release: SGD, momentum 0.9, Nesterov,
    # no weight decay.
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BASE_LR = 0.001
    # SGD only.
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = False
    # AdamW only.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.EPS = 1e-8
    # Decoupled (AdamW) or L2 (SGD) weight decay; never applied to biases, norm weights, position embeddings and
    # class tokens/embeddings (pos_embed, cls_token, cls_emb, ...).
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    # Layer-wise lr decay (ViTDet/BEiT): embeddings are layer 0, encoder block i layer i + 1, everything after the
    # last block layer depth + 1; a parameter of layer l gets lr * LAYER_DECAY^(depth + 1 - l). 1.0 = off.
    cfg.SOLVER.LAYER_DECAY = 1.0
    # "poly" (lr = (base - min) * (1 - t/T)^POLY_POWER + min, the release's) or "cosine".
    cfg.SOLVER.LR_SCHEDULER = "poly"
    cfg.SOLVER.POLY_POWER = 0.9
    cfg.SOLVER.MIN_LR = 1e-5
    # lr multiplier of every parameter whose name contains "head" (mmseg's paramwise custom_keys {'head': lr_mult};
    # SETR and SegViT: 10). 1.0 = off.
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 1.0
    # Linear warmup from WARMUP_FACTOR * lr over WARMUP_ITERS steps (0 = none).
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    # Gradient clipping, detectron2's and Mask2Former's keys (their YAMLs load as they are). DeepSpeed clips the L2
    # norm of all gradients together, so with ENABLED the trainer takes CLIP_TYPE "full_model" (Mask2Former's name
    # for that) and NORM_TYPE 2.0 only, and raises naming the key for any other value.
    cfg.SOLVER.CLIP_GRADIENTS = CN()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    # Save a checkpoint (OUTPUT_DIR/checkpoints/iter_XXXXXXX) every this many steps and at the end; keep the newest
    # MAX_CHECKPOINTS_TO_KEEP of them (0 = keep all).
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    cfg.SOLVER.MAX_CHECKPOINTS_TO_KEEP = 2
    # Write losses/lr/timing to the console, metrics.json and TensorBoard every this many steps.
    cfg.SOLVER.LOG_PERIOD = 20


def _deepspeed(cfg: CN) -> None:
    cfg.DEEPSPEED = CN()
    # ZeRO stage 0-3 (partitioning of optimizer states / gradients / parameters across ranks).
    cfg.DEEPSPEED.ZERO_STAGE = 0
    # "fp32", "bf16" or "fp16" (fp16 needs a GPU: DeepSpeed's CPU backend has none).
    cfg.DEEPSPEED.PRECISION = "fp32"
    # torch.distributed backend: "nccl", "gloo", or "auto" = nccl when MODEL.DEVICE is cuda, gloo otherwise.
    cfg.DEEPSPEED.BACKEND = "auto"
    # Seconds every rank may take to join the run at start; rank 0 logs the ranks still missing every 30 s and then
    # stops naming them (a rank that never started, or one stopped with SIGSTOP).
    cfg.DEEPSPEED.START_TIMEOUT = 600
    # Seconds a collective operation (all-reduce, barrier, ...) may wait for the slowest rank before failing.
    cfg.DEEPSPEED.COLLECTIVE_TIMEOUT = 1800


def _test(cfg: CN) -> None:
    cfg.TEST = CN()
    # Evaluate every this many training steps (and at the end); 0 = only at the end.
    cfg.TEST.EVAL_PERIOD = 0
    # Test-time inference (algm_d2.modeling.SegmentationModel).
    # "whole": one forward per (resized) image; "slide": the release's sliding window of CROP_SIZE every STRIDE.
    cfg.TEST.MODE = "whole"
    cfg.TEST.CROP_SIZE = 512
    cfg.TEST.STRIDE = 512
    # Crops per network forward in "slide" mode (the release's inference batch).
    cfg.TEST.BATCH_SIZE = 8
    # Scale factors of the test image (multi-scale averages the class probabilities) and horizontal flip.
    cfg.TEST.SCALES = [1.0]
    # Inference precision: "fp32" (the reference), or "bf16" / "fp16" autocast.
    cfg.TEST.PRECISION = "fp32"
    cfg.TEST.FLIP = False
    # Evaluation takes the labels of a single view (one scale, no flip) with a fused resize + argmax instead of
    # computing [K, H, W] probabilities first (same labels); False computes the probabilities.
    cfg.TEST.FUSED_LABELS = True
    # Softmax over classes of each view's scores before views (scales, flips) are averaged, also for networks whose
    # scores are already probability-like (Mask2Former): EVA's aug_test does; False averages such scores as they are.
    cfg.TEST.SOFTMAX_VIEWS = False
    # "slide" mode, an image whose short side is below CROP_SIZE: "upsample" it to the crop (Segmenter's release) or
    # "pad" it with black pixels to the crop and drop the padding after sliding (EVA's PadShortSide).
    cfg.TEST.SLIDE_SMALL_IMAGE = "upsample"

    # Evaluation reporting (algm_d2.evaluation).
    # Count GFLOPs (fvcore multiply-adds, attention included) during evaluation.
    cfg.TEST.COMPUTE_FLOPS = False
    # "fvcore" (jit trace, the counter behind the paper's numbers) or "torch" (FlopCounterMode, no tracing).
    cfg.TEST.FLOPS_BACKEND = "fvcore"
    # ALGM's count depends on the image: average it over this many of the first evaluation inputs.
    cfg.TEST.FLOPS_NUM_IMAGES = 20
    # First batches of an evaluation run left out of its images/s (warm-up).
    cfg.TEST.TIMER_WARMUP_BATCHES = 5
    # Collect per-block token counts during evaluation (models that report merge_stats).
    cfg.TEST.MERGE_STATS = True
    # Evaluations during training write this many validation images (input | ground truth | prediction) to
    # TensorBoard, the first ones of each DATASETS.TEST; 0 = none.
    cfg.TEST.TENSORBOARD_IMAGES = 3


def precision_dtype(precision: str, key: str = "precision") -> Optional["torch.dtype"]:  # noqa: F821
    """The autocast dtype of one of ``PRECISIONS`` (None for fp32, the reference); ValueError naming ``key``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_device(name: str) -> str:
    """MODEL.DEVICE with "auto" replaced by "cuda" when a GPU is visible, else "cpu"."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_cfg() -> CN:
    """A fresh config with every key at its default."""
    cfg = CN()
    _model(cfg)
    _input(cfg)
    _datasets(cfg)
    _dataloader(cfg)
    _solver(cfg)
    _deepspeed(cfg)
    _test(cfg)
    # Random seed for Python, NumPy and torch on every rank (offset by rank for data workers); < 0 = random.
    cfg.SEED = 0
    # Directory for the merged config, checkpoints, metrics.json, TensorBoard events and results.
    cfg.OUTPUT_DIR = "./output"
    return cfg
