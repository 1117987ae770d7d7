import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip import (CLIP, PRESETS, Tokenizer, attention, clip_loss, contrastive_loss, count_parameters, flops_per_sample,
                  get_config, resize_position_embeddings, sigmoid_loss)


def small_config(**kw):
    return get_config("tiny", vision_layers=2, text_layers=2, **kw)


def random_batch(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    tokens = torch.randint(0, 1000, (batch, cfg.context_length), generator=g)
    lengths = torch.randint(1, cfg.context_length, (batch,), generator=g)
    eot = Tokenizer(cfg.encoding, cfg.context_length).eot
    for i, n in enumerate(lengths):
        tokens[i, n:] = eot
    return images, tokens


# ---------------------------------------------------------------------------- presets and shapes

@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16", "ViT-L/14"])
def test_paper_vision_towers_match_openclip_parameter_counts(name):
    # OpenCLIP's model profile (docs/model_profile.csv, image_params column) lists the vision towers
    # at 87.85M, 86.19M and 303.97M. We count ours on the meta device, without allocating them.
    expected = {"ViT-B/32": 87.85e6, "ViT-B/16": 86.19e6, "ViT-L/14": 303.97e6}[name]
    assert abs(count_parameters(PRESETS[name])["vision"] - expected) / expected < 0.01


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_and_dtypes_for_every_preset(name):
    cfg = PRESETS[name]
    small = name == "tiny"
    device = "cpu" if small else "meta"  # the big presets are checked without allocating them
    with torch.device(device):
        model = CLIP(cfg)
    images = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device)
    tokens = torch.zeros(2, cfg.context_length, dtype=torch.long, device=device)
    tokens[:, -1] = model.text.eot
    img, txt, scale, bias = model(images, tokens)
    assert img.shape == txt.shape == (2, cfg.embed_dim)
    assert img.dtype == txt.dtype == torch.float32
    assert scale.shape == () and bias is None
    if small:
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
        assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt, _, _ = model(images, tokens)
        assert torch.isfinite(clip_loss(img, txt, scale)).all()


def test_temperature_is_clamped_at_100():
    model = CLIP(small_config())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    cfg = model.config
    images, tokens = random_batch(cfg, 2)
    assert model(images, tokens)[2].item() == pytest.approx(100.0)


def test_cost_estimate_matches_parameter_count():
    # for a transformer, forward FLOPs per token ~ 2 x (matmul parameters); check the text tower exactly
    cfg = get_config("tiny", image_size=32, patch_size=32, vision_layers=0)  # one patch, no vision blocks
    counts = count_parameters(cfg)
    w = cfg.text_width
    blocks = CLIP(cfg).text.transformer.blocks
    matmul = lambda block: sum(p.numel() for n, p in block.named_parameters() if n.endswith("weight") and p.dim() == 2)
    vision = 2 * 3 * 32 * 32 * cfg.vision_width + 2 * cfg.vision_width * cfg.embed_dim
    for T in (cfg.context_length, 5):  # full length, and a batch the loader cut after 5 positions
        # every block but the last: all T rows; the last: keys and values (2w^2 per row) of all T rows, the rest for one row
        text = sum(2 * T * matmul(b) + 4 * T * T * w for b in blocks[:-1])
        text += 2 * T * 2 * w * w + 2 * (matmul(blocks[-1]) - 2 * w * w) + 4 * T * w
        text += 2 * w * cfg.embed_dim
        assert flops_per_sample(cfg, text_length=T) == 3 * (text + vision)
        if T == cfg.context_length:
            assert flops_per_sample(cfg) == 3 * (text + vision)
    assert counts["total"] == counts["vision"] + counts["text"] + 1


def test_weight_init_scales():
    model = CLIP(get_config("tiny"))
    std = lambda p: p.detach().float().std().item()
    assert std(model.text.token_embedding.weight) == pytest.approx(0.02, rel=0.05)
    # residual projections are scaled down by depth (GPT-2)
    proj = model.text.transformer.blocks[0].attn.proj.weight
    assert std(proj) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)

# ---------------------------------------------------------------------------- text tower


def test_text_tower_is_causal():
    torch.manual_seed(0)
    cfg = small_config()
    model = CLIP(cfg).eval()
    tok = Tokenizer(cfg.encoding, cfg.context_length)
    tokens = tok(["a small red circle in the top left"])
    eot_pos = int((tokens[0] == tok.eot).nonzero()[0])
    base = model.encode_text(tokens)
    after = tokens.clone()
    after[0, eot_pos + 1:] = torch.randint(0, 1000, (cfg.context_length - eot_pos - 1,))
    torch.testing.assert_close(model.encode_text(after), base, rtol=0, atol=1e-6)
    before = tokens.clone()
    before[0, 1] = (before[0, 1] + 7) % 1000
    assert (model.encode_text(before) - base).abs().max() > 1e-3



def test_pooled_last_layer_equals_every_row_of_every_layer():
    # the towers compute only the pooled row (class token, end of text) in their last layer; the plain
    # path runs every row through every block and reads the pooled row out after: same features, same grads
    torch.manual_seed(0)
    cfg = small_config(loss="siglip")
    model = CLIP(cfg)
    images, tokens = random_batch(cfg, 6)

    def plain(model):
        v, t = model.visual, model.text
        x = v.patch_embed(v.patchify((images.float() / 255 - v.mean) / v.std))
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.pos_embedding
        for block in v.transformer.blocks:
            x = block(x)
        img = F.normalize(v.proj(v.ln_f(x[:, 0])), dim=-1)
        x = t.token_embedding(tokens) + t.pos_embedding
        for block in t.transformer.blocks:
            x = block(x)
        eot = (tokens == t.eot).int().argmax(dim=1)
        txt = F.normalize(t.proj(t.ln_f(x[torch.arange(len(x)), eot])), dim=-1)
        scale = model.logit_scale.exp()
        return img, txt, scale, model.logit_bias

    def grads(outputs):
        model.zero_grad()
        clip_loss(*outputs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, ref = model(images, tokens), plain(model)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-6)
    assert (fast[1][0] - fast[1][1]).abs().max() > 1e-3  # the captions differ, so the features do
    fast_grads, ref_grads = grads(model(images, tokens)), grads(plain(model))
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    model.set_grad_checkpointing(True)
    name = "text.transformer.blocks.1.attn.qkv.weight"
    torch.testing.assert_close(grads(model(images, tokens))[name], ref_grads[name], rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("T", [17, 32, 200])
def test_attention_in_bf16_on_a_cpu_equals_exact_attention(T, monkeypatch):
    # on a CPU in bf16, attention() leaves SDPA's flash kernel for matmul-softmax-matmul up to 128 keys (its
    # backward is slow there): either way, outputs and gradients equal exact attention up to bf16's rounding,
    # bidirectional, causal, and for the pooled row under its mask
    sdpa_calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(0)
    B, H, hs = 4, 2, 32
    q, k, v, dy = (torch.randn(B, H, T, hs, generator=g).bfloat16() for _ in range(4))
    pool = torch.randint(0, T, (B,), generator=g)
    pool_mask = (torch.arange(T) <= pool[:, None]).view(B, 1, 1, T)

    def exact(q, k, v, causal, mask):  # in float64, from the same bf16 inputs
        s = q @ k.transpose(-2, -1) / math.sqrt(hs)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(dim=-1) @ v

    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    for causal, mask, rows in ((False, None, T), (True, None, T), (False, pool_mask, 1)):
        inputs = [x.clone().requires_grad_() for x in (q[:, :, :rows], k, v)]
        reference = [x.detach().double().requires_grad_() for x in inputs]
        attention(*inputs, causal=causal, mask=mask).backward(dy[:, :, :rows])
        out = attention(*[x.detach() for x in inputs], causal=causal, mask=mask)
        ref_out = exact(*reference, causal, mask)
        ref_out.backward(dy[:, :, :rows].double())
        assert rel(out, ref_out) < 1e-2, (causal, rows)
        for x, ref in zip(inputs, reference):
            assert rel(x.grad, ref.grad) < 2e-2, (causal, rows)
    assert len(sdpa_calls) == (6 if T > 128 else 0)  # the fused kernel beyond 128 keys only
    attention(q.float(), k.float(), v.float())  # fp32 on a CPU (and any GPU): always the fused kernel
    assert len(sdpa_calls) == (7 if T > 128 else 1)

# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_edge_cases():
    tok = Tokenizer("cl100k_base", 32)
    caption = "a large blue triangle in the bottom right"
    ids = tok([caption])
    assert ids.shape == (1, 32) and ids.dtype == torch.int32
    assert tok.decode(ids[0]) == caption
    assert (ids[0] == tok.eot).any()
    captions = ["", "café naïve 東京 Ωmega", "🙂🎉🚀", "x" * 10_000, "word " * 5000, "<|endoftext|> is text"]
    ids = tok(captions)
    assert ids.shape == (len(captions), 32)
    assert (ids == tok.eot).any(dim=1).all(), "every row must hold an end-of-text token"
    assert tok.decode(ids[0]) == ""
    assert tok.decode(ids[1]) == captions[1] and tok.decode(ids[2]) == captions[2]
    assert ids[3, -1] == tok.eot and ids[4, -1] == tok.eot  # truncated, then terminated
    # special-token text is encoded as ordinary text, never as a control token
    assert int((ids[5] == tok.eot).nonzero()[0]) > 1


def test_trimmed_tokens_give_the_same_text_features():
    torch.manual_seed(0)
    cfg = small_config()
    model = CLIP(cfg).eval()
    tok = Tokenizer(cfg.encoding, cfg.context_length)
    short = ["a red circle", "a large blue triangle in the bottom right", ""]
    full, trimmed = tok(short), tok(short, trim=True)
    width = max(len(tok.enc.encode_ordinary(c)) for c in short) + 1
    assert trimmed.shape == (3, width) and width < cfg.context_length and torch.equal(trimmed, full[:, :width])
    assert (full[:, width:] == tok.eot).all()
    torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(full), rtol=1e-5, atol=1e-6)
    assert tok(short + ["word " * 500], trim=True).shape == (4, cfg.context_length)  # truncated: full width
    assert tok([], trim=True).shape[0] == 0


def test_default_encoding_is_offline_cl100k():
    tok = Tokenizer()
    assert tok.enc.n_vocab == 100277 and tok.eot == 100257
    assert tok.enc.encode("hello world") == [15339, 1917]  # cl100k_base's well-known ids

# ---------------------------------------------------------------------------- losses vs naive references


def naive_contrastive(img, txt, scale):
    B = img.shape[0]
    logits = scale * img @ txt.T
    total = 0.0
    for i in range(B):  # each image against every caption
        total = total - torch.log_softmax(logits[i, :], dim=0)[i]
    for j in range(B):  # each caption against every image
        total = total - torch.log_softmax(logits[:, j], dim=0)[j]
    return total / (2 * B)


def naive_sigmoid(img, txt, scale, bias):
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias)))
    return total / B


def test_losses_equal_naive_references():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    torch.testing.assert_close(contrastive_loss(img, txt, scale), naive_contrastive(img, txt, scale))
    torch.testing.assert_close(sigmoid_loss(img, txt, scale, bias), naive_sigmoid(img, txt, scale, bias))
    assert contrastive_loss(img, img, torch.tensor(100.0, dtype=torch.float64)) < 1e-3  # perfect alignment


def test_siglip_model_has_bias_and_paper_init():
    model = CLIP(small_config(loss="siglip"))
    images, tokens = random_batch(model.config, 4)
    img, txt, scale, bias = model(images, tokens)
    assert scale.item() == pytest.approx(10.0) and bias.item() == pytest.approx(-10.0)
    loss = clip_loss(img, txt, scale, bias)
    loss.backward()
    assert model.logit_bias.grad is not None and model.logit_scale.grad is not None

# ---------------------------------------------------------------------------- distributed exactness


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, loss_name, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = small_config(loss=loss_name)
    model = torch.nn.parallel.DistributedDataParallel(CLIP(cfg))
    images, tokens = random_batch(cfg, 8 * world)
    rows = slice(rank * 8, (rank + 1) * 8)
    loss = clip_loss(*model(images[rows], tokens[rows]))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_two_ranks_train_exactly_like_one_process(tmp_path, loss_name):
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), loss_name, str(tmp_path)), nprocs=world)
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    cfg = small_config(loss=loss_name)
    model = CLIP(cfg)
    images, tokens = random_batch(cfg, 8 * world)
    loss = clip_loss(*model(images, tokens))
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_position_embeddings_resize_to_another_grid_and_context():
    cfg = get_config("tiny", patch_size=8, vision_layers=1, text_layers=1)  # 64 px: an 8x8 grid
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    state = model.state_dict()
    assert all(resize_position_embeddings(state, cfg)[k] is v for k, v in state.items())  # the same shape: unchanged
    # the patch grid resampled as an image, rows as rows: against bicubic interpolation written out, Keys'
    # cubic kernel (a = -0.75, as PyTorch's) over the old patch centres, the border patches repeated
    W = cfg.vision_width

    def cubic(t, a=-0.75):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a

    resample = torch.zeros(16, 8)  # new patch centre k from the old ones: k sits at (k + 0.5) / 2 - 0.5 old patches
    for k in range(16):
        at = (k + 0.5) / 2 - 0.5
        for j in range(math.floor(at) - 1, math.floor(at) + 3):
            resample[k, min(max(j, 0), 7)] += cubic(at - j)
    grid = torch.randn(8, 8, W)
    state["visual.pos_embedding"] = torch.cat([torch.randn(1, W), grid.reshape(64, W)])
    big = replace(cfg, image_size=128, context_length=12)  # a 16x16 grid
    got = resize_position_embeddings(state, big)
    assert got["visual.pos_embedding"].shape == (1 + 16 * 16, W)
    torch.testing.assert_close(got["visual.pos_embedding"][0], state["visual.pos_embedding"][0], rtol=0, atol=0)
    naive = torch.einsum("ki,ijw,lj->klw", resample, grid, resample)
    torch.testing.assert_close(got["visual.pos_embedding"][1:].reshape(16, 16, W), naive, rtol=1e-5, atol=1e-5)
    # the text's positions: cut to the new context, so a caption that fits has the features it had
    text = got["text.pos_embedding"]
    torch.testing.assert_close(text, state["text.pos_embedding"][:12], rtol=0, atol=0)
    short = replace(cfg, context_length=12)
    cut = CLIP(short).eval()
    cut.load_state_dict(resize_position_embeddings(model.state_dict(), short))
    tokens = Tokenizer(cfg.encoding, 12)(["a red circle", "a small blue star in the top left"], trim=True)
    with torch.no_grad():
        torch.testing.assert_close(cut.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=0)
    # or extended, the old rows first and new ones drawn at the init's scale
    longer = resize_position_embeddings(state, replace(cfg, context_length=96))["text.pos_embedding"]
    assert longer.shape == (96, cfg.text_width)
    torch.testing.assert_close(longer[:32], state["text.pos_embedding"], rtol=0, atol=0)
    assert 0.005 < longer[32:].std() < 0.02


def test_patch_dropout_runs_only_the_kept_patches():
    cfg = get_config("tiny", patch_size=8, vision_layers=2, text_layers=1)  # 64 patches
    torch.manual_seed(0)
    model = CLIP(cfg)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    everything = torch.arange(64).expand(3, 64)
    assert torch.equal(model.encode_image(images, keep=everything), model.encode_image(images))
    keep = torch.rand(3, 64).argsort(dim=1)[:, :20]  # 20 patches each, a different 20 per image
    got = model.encode_image(images, keep=keep, normalize=False)
    # naive: every patch embedded with its position, then the kept ones picked, the class token put first
    v = model.visual
    x = v.patch_embed(v.patchify((images.float() / 255 - v.mean) / v.std)) + v.pos_embedding[1:]
    x = torch.stack([x[b, keep[b]] for b in range(3)])
    x = torch.cat([(v.class_embedding + v.pos_embedding[0]).expand(3, 1, -1), x], dim=1)
    for block in v.transformer.blocks:  # every row of every layer
        x = block(x)
    want = v.proj(v.ln_f(x[:, 0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the order the patches are listed in does not matter (their positions come with them)
    torch.testing.assert_close(model.encode_image(images, keep=keep.flip(1), normalize=False), got,
                               rtol=1e-5, atol=1e-5)
    # only the kept patches' position embeddings learn from the step
    got.sum().backward()
    learned = v.pos_embedding.grad[1:].abs().sum(dim=1) > 0
    assert torch.equal(learned, torch.zeros(64, dtype=torch.bool).index_fill(0, keep.flatten(), True))
    # and the FLOPs counted are those of the patches run
    assert flops_per_sample(cfg, patches=20) < flops_per_sample(cfg) == flops_per_sample(cfg, patches=64)
    # a locked tower (LiT) runs its forward only: a third of its cost
    both, forward = flops_per_sample(cfg), flops_per_sample(cfg, trained=())
    text_only, vision_only = flops_per_sample(cfg, trained=("text",)), flops_per_sample(cfg, trained=("vision",))
    assert both == 3 * forward and (both - text_only) + (both - vision_only) == 2 * forward
